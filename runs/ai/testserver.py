"""A local LLM server for development and tests: the OpenAI Chat Completions protocol (and enough of
Anthropic's Messages API for the Anthropic SDK), answering deterministically and failing on request.

Endpoints: POST /v1/chat/completions (JSON, or SSE with `stream: true`, with the final usage chunk when
`stream_options.include_usage`), POST /v1/messages (Anthropic; JSON or SSE), GET /v1/models, GET /_stats
(request counts by model and status, so a test can count billed calls), POST /_reset (zero the counters).

How it answers, first rule that applies:
1. a rule of the `--script` file whose `model` glob / `contains` text match and whose `times` aren't used up:
   `{"rules": [{"model": "gpt-*", "contains": "hello", "times": 2, "status": 429, "retry_after": 0.1},
   {"reply": "hi", "delay": 0.2}, {"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]}`; a rule with no
   answer (`status`, `tool_calls`, `output`, `reply`) only delays: `{"calls": 3, "delay": 20}` holds the third
   request, then answers it as if no rule applied;
2. fault directives anywhere in the messages: `[[model-down: gpt-5-mini, o3]]` (those models always 503;
   bare `[[model-down]]`: every model), `[[fail: 429 x2]]` (the first 2 requests with this exact body get 429
   with `Retry-After: 0.1`, then the next directive or success; `[[fail: 500 x1]]`), `[[slow: 0.5]]` (wait
   before answering), `[[chunk-delay: 0.05]]` (wait between streamed chunks);
3. answer directives in the system messages and the last user message: `[[tool: name {"json": "args"}]]`
   calls that tool when the request offers tools and the last message isn't a tool result (several make
   parallel calls); `[[reply: text]]` answers `text`;
3b. with tools offered and no directive, the server acts like an agent: it calls the tool not called yet in
   the conversation that shares most words with the last user message (its name and description count;
   ties go to the order offered), one per turn, with arguments built from the tool's schema; when each was
   called, Pydantic AI's output tool (`final_result...`) if offered, else it answers;
4. after a tool result: "Tool <name> returned: <result>"; otherwise "Summary: " + the first 12 words of the
   last user message.

Structured output: with `response_format` `{"type": "json_schema", "json_schema": {"schema": ...}}` a text
answer is JSON: a rule's `"output": {...}` or a reply that is JSON already, else an instance the server
builds from the schema (every property filled: strings from the answer's text, the first of an enum, ...);
with `{"type": "json_object"}`, `{"answer": <text>}` unless the reply is a JSON object. Rules may also match
on `"calls": N` (the N-th request the server received, 1-based) and `"last_role"` ("user", "tool").

Token counts are words (at least 1): input is every message's words, output the answer's (or the tool
calls' names and arguments).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DIRECTIVE = re.compile(r"\[\[\s*([a-z][a-z-]*)\s*(?::\s*(.*?))?\s*\]\]", re.S)
FAIL_SPEC = re.compile(r"^(\d{3})(?:\s*x\s*(\d+))?$")
SUMMARY_WORDS = 12
ANSWER_KEYS = frozenset({"status", "tool_calls", "output", "reply"})  # a rule with none of them only delays
OUTPUT_TOOL_PREFIX = "final_result"  # Pydantic AI's output tools: called last, to give the structured answer
_WORD = re.compile(r"[a-z0-9]+")
DEFAULT_RETRY_AFTER = 0.1
MODELS = ["local-small", "local-large", "gpt-5-mini", "claude-haiku"]  # what GET /v1/models lists, plus seen ones

OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


@dataclass
class Conversation:
    """A request in either protocol, reduced to what the rules look at."""

    model: str
    messages: list[tuple[str, str]]  # (role, text); role "tool" for tool results
    has_tools: bool
    stream: bool
    include_usage: bool
    body_key: str  # identifies this exact request body, for `[[fail: ...]]` counting
    tool_names: dict[str, str] = field(default_factory=dict)  # tool call id -> tool name, from the history
    response_format: dict[str, Any] | None = None  # OpenAI's structured output request, as sent
    tools: list[dict[str, Any]] = field(default_factory=list)  # offered: [{"name", "description", "parameters"}]

    def texts(self, roles: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")) -> list[str]:
        return [text for role, text in self.messages if role in roles]

    @property
    def last_role(self) -> str:
        return self.messages[-1][0] if self.messages else ""

    def last_user_text(self) -> str:
        return next((text for role, text in reversed(self.messages) if role == "user"), "")


@dataclass
class Answer:
    status: int = 200
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "arguments"}]
    delay: float = 0.0
    chunk_delay: float = 0.0
    retry_after: float | None = None
    error: str = ""


class LLMServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], *, script: dict | list | None = None, verbose: bool = False):
        super().__init__(address, LLMRequestHandler)
        rules = script.get("rules", []) if isinstance(script, dict) else (script or [])
        self.rules = [dict(rule) for rule in rules]
        self.verbose = verbose
        self.lock = threading.Lock()
        self.reset()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.by_model: Counter[str] = Counter()
            self.by_status: Counter[str] = Counter()
            self.seen_bodies: Counter[str] = Counter()
            self.rule_uses = [0] * len(self.rules)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_model": dict(self.by_model),
                "by_status": dict(self.by_status),
            }

    def record(self, model: str, status: int) -> None:
        with self.lock:
            self.by_status[str(status)] += 1

    def answer(self, conversation: Conversation) -> Answer:
        with self.lock:
            self.requests += 1
            self.by_model[conversation.model] += 1
            self.seen_bodies[conversation.body_key] += 1
            nth = self.seen_bodies[conversation.body_key]  # this body's 1st, 2nd, ... request
            rule = self._take_rule(conversation)
        if rule is not None and ANSWER_KEYS & set(rule):
            answer = answer_from_rule(rule, conversation)
        else:  # no rule, or one that only delays: the directives (and the offline agent) answer
            answer = answer_from_directives(conversation, nth)
            if rule is not None:
                answer.delay = float(rule.get("delay", answer.delay))
                answer.chunk_delay = float(rule.get("chunk_delay", answer.chunk_delay))
        return structured(answer, conversation)

    def _take_rule(self, conversation: Conversation) -> dict | None:
        everything = "\n".join(conversation.texts())
        for i, rule in enumerate(self.rules):
            if not fnmatch.fnmatchcase(conversation.model, rule.get("model", "*")):
                continue
            if rule.get("contains") and rule["contains"] not in everything:
                continue
            if rule.get("calls") is not None and rule["calls"] != self.requests:
                continue
            if rule.get("last_role") and rule["last_role"] != conversation.last_role:
                continue
            if rule.get("times") is not None and self.rule_uses[i] >= rule["times"]:
                continue
            self.rule_uses[i] += 1
            return rule
        return None

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve_in_thread(
    port: int = 0, *, host: str = "127.0.0.1", script: dict | list | None = None
) -> tuple[LLMServer, str]:
    """Start a server on a daemon thread; return it and its base URL (`http://127.0.0.1:<port>/v1`).
    `server.stop()` shuts it down."""
    server = LLMServer((host, port), script=script)
    threading.Thread(target=server.serve_forever, name="llm-server", daemon=True).start()
    return server, server.base_url


def load_script(path: str | Path) -> dict | list:
    return json.loads(Path(path).read_text())


# --- the rules --------------------------------------------------------------------------------------------


def directives(texts: list[str]) -> list[tuple[str, str]]:
    return [(name, (arg or "").strip()) for text in texts for name, arg in DIRECTIVE.findall(text)]


def strip_directives(text: str) -> str:
    return " ".join(DIRECTIVE.sub(" ", text).split())


def answer_from_rule(rule: dict, conversation: Conversation) -> Answer:
    answer = Answer(delay=float(rule.get("delay", 0)), chunk_delay=float(rule.get("chunk_delay", 0)))
    if rule.get("status", 200) != 200:
        answer.status = int(rule["status"])
        answer.retry_after = rule.get("retry_after", DEFAULT_RETRY_AFTER if answer.status == 429 else None)
        answer.error = rule.get("error", f"scripted {answer.status}")
    elif rule.get("tool_calls"):
        answer.tool_calls = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in rule["tool_calls"]]
    elif "output" in rule:
        answer.text = json.dumps(rule["output"])
    elif "reply" in rule:
        answer.text = str(rule["reply"])
    else:
        answer.text = default_text(conversation)
    return answer


def answer_from_directives(conversation: Conversation, nth: int) -> Answer:
    answer = Answer()
    faults = directives(conversation.texts())
    failures: list[tuple[int, int]] = []
    for name, arg in faults:
        if name == "slow":
            answer.delay = float(arg or 0)
        elif name == "chunk-delay":
            answer.chunk_delay = float(arg or 0)
        elif name == "model-down":
            down = [m.strip() for m in arg.split(",") if m.strip()]
            if not down or any(fnmatch.fnmatchcase(conversation.model, m) for m in down):
                answer.status, answer.error = 503, f"model {conversation.model} is down"
                return answer
        elif name == "fail" and (match := FAIL_SPEC.match(arg)):
            failures.append((int(match.group(1)), int(match.group(2) or 1)))
    # `[[fail: 429 x2]] [[fail: 500 x1]]`: requests 1-2 get 429, request 3 gets 500, request 4 succeeds.
    passed = 0
    for status, times in failures:
        if nth <= passed + times:
            answer.status, answer.error = status, f"injected {status} ({nth - passed} of {times})"
            answer.retry_after = DEFAULT_RETRY_AFTER if status == 429 else None
            return answer
        passed += times

    said = directives(conversation.texts(("system", "developer")) + [conversation.last_user_text()])
    if conversation.last_role != "tool" and conversation.has_tools:
        answer.tool_calls = [parse_tool_directive(arg) for name, arg in said if name == "tool"]
        if answer.tool_calls:
            return answer
    replies = [arg for name, arg in said if name == "reply"]
    if not replies and conversation.tools and (call := next_tool_call(conversation)) is not None:
        answer.tool_calls = [call]
        return answer
    answer.text = replies[-1] if replies else default_text(conversation)
    return answer


def next_tool_call(conversation: Conversation) -> dict[str, Any] | None:
    """What an agent would do next offline: call the offered tool not called yet in this conversation that
    shares most words with the last user message (ties: the order offered), arguments built from its schema;
    once every tool was called, an output tool (Pydantic AI's `final_result...`) if one is offered. Strings
    in the arguments are the last user message's words (an output tool's: the answer, as text, so far)."""
    called = {name for key, name in conversation.tool_names.items() if key != "__last__"}
    wanted = set(_WORD.findall(strip_directives(conversation.last_user_text()).lower()))
    tools = [tool for tool in conversation.tools if tool["name"] not in called]
    functions = [tool for tool in tools if not tool["name"].startswith(OUTPUT_TOOL_PREFIX)]
    if functions:
        chosen = max(
            functions,
            key=lambda tool: len(wanted & set(_WORD.findall(f"{tool['name']} {tool['description']}".lower()))),
        )
    elif tools:
        chosen = tools[0]
    else:
        return None
    output = chosen["name"].startswith(OUTPUT_TOOL_PREFIX)
    text = default_text(conversation) if output else strip_directives(conversation.last_user_text())
    schema = chosen["parameters"] or {"type": "object", "properties": {}}
    arguments = instance_of(schema, schema, text)
    return {"name": chosen["name"], "arguments": arguments if isinstance(arguments, dict) else {}}


def structured(answer: Answer, conversation: Conversation) -> Answer:
    """Make a text answer the JSON that the request's `response_format` asks for."""
    fmt = conversation.response_format or {}
    if answer.status != 200 or answer.tool_calls or fmt.get("type") not in ("json_schema", "json_object"):
        return answer
    try:
        parsed = json.loads(answer.text)
    except ValueError:
        parsed = None
    if fmt["type"] == "json_object":
        if not isinstance(parsed, dict):
            answer.text = json.dumps({"answer": answer.text})
        return answer
    if parsed is None:
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        answer.text = json.dumps(instance_of(schema, schema, answer.text))
    return answer


def instance_of(schema: Any, root: dict, text: str, depth: int = 0) -> Any:
    """A deterministic value valid for a JSON schema (the subset OpenAI's structured outputs use)."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return instance_of(target, root, text, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(combinator) or [] if not (isinstance(o, dict) and o.get("type") == "null")]
        if options:
            return instance_of(options[0], root, text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {name: instance_of(sub, root, text, depth + 1) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [instance_of(schema.get("items") or {}, root, text, depth + 1)] * max(1, schema.get("minItems", 1))
    if kind == "integer":
        return max(word_count(text), int(schema.get("minimum", 0)))
    if kind == "number":
        return float(max(word_count(text), schema.get("minimum", 0)))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def default_text(conversation: Conversation) -> str:
    if conversation.last_role == "tool":
        role_text = conversation.messages[-1][1]
        name = conversation.tool_names.get("__last__", "tool")
        return f"Tool {name} returned: {role_text}"
    words = strip_directives(conversation.last_user_text()).split()
    return "Summary: " + (" ".join(words[:SUMMARY_WORDS]) or "(nothing)")


def parse_tool_directive(arg: str) -> dict[str, Any]:
    name, _, rest = arg.partition(" ")
    try:
        arguments = json.loads(rest) if rest.strip() else {}
    except json.JSONDecodeError:
        arguments = {"input": rest.strip()}
    return {"name": name, "arguments": arguments}


def word_count(*texts: str) -> int:
    return max(1, sum(len(text.split()) for text in texts))


def output_tokens(answer: Answer) -> int:
    if answer.tool_calls:
        return word_count(*(c["name"] + " " + json.dumps(c["arguments"]) for c in answer.tool_calls))
    return word_count(answer.text)


def text_chunks(text: str) -> list[str]:
    """Word by word, each with its trailing space, so the chunks join back to the text."""
    return re.findall(r"\s*\S+\s*", text) or [text]


def call_id(body_key: str, index: int) -> str:
    return "call_" + hashlib.sha256(f"{body_key}:{index}".encode()).hexdigest()[:16]


# --- protocols --------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content")))
                else:
                    parts.append(part.get("text", ""))
        return "".join(parts)
    return str(content)


def body_key(path: str, body: dict) -> str:
    return hashlib.sha256((path + json.dumps(body, sort_keys=True)).encode()).hexdigest()


def openai_conversation(body: dict, key: str) -> Conversation:
    messages, tool_names = [], {}
    for message in body.get("messages") or []:
        role = message.get("role", "user")
        for call in message.get("tool_calls") or []:
            tool_names[call.get("id", "")] = call.get("function", {}).get("name", "tool")
        if role == "tool":
            tool_names["__last__"] = tool_names.get(message.get("tool_call_id", ""), "tool")
        messages.append((role, _text_of(message.get("content"))))
    return Conversation(
        model=str(body.get("model", "")),
        messages=messages,
        has_tools=bool(body.get("tools")),
        stream=bool(body.get("stream")),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        body_key=key,
        tool_names=tool_names,
        response_format=body.get("response_format") if isinstance(body.get("response_format"), dict) else None,
        tools=[
            {
                "name": str(fn.get("name") or ""),
                "description": str(fn.get("description") or ""),
                "parameters": fn.get("parameters") or {},
            }
            for tool in body.get("tools") or []
            if isinstance(tool, dict) and isinstance(fn := tool.get("function", tool), dict) and fn.get("name")
        ],
    )


def anthropic_conversation(body: dict, key: str) -> Conversation:
    messages: list[tuple[str, str]] = []
    tool_names: dict[str, str] = {}
    if body.get("system"):
        messages.append(("system", _text_of(body["system"])))
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        for block in blocks:
            if block.get("type") == "tool_use":
                tool_names[block.get("id", "")] = block.get("name", "tool")
        results = [b for b in blocks if b.get("type") == "tool_result"]
        if message.get("role") == "user" and results:
            tool_names["__last__"] = tool_names.get(results[-1].get("tool_use_id", ""), "tool")
            messages.append(("tool", _text_of(results)))
        else:
            messages.append((message.get("role", "user"), _text_of(content)))
    return Conversation(
        model=str(body.get("model", "")),
        messages=messages,
        has_tools=bool(body.get("tools")),
        stream=bool(body.get("stream")),
        include_usage=True,
        body_key=key,
        tool_names=tool_names,
        tools=[
            {
                "name": str(tool.get("name") or ""),
                "description": str(tool.get("description") or ""),
                "parameters": tool.get("input_schema") or {},
            }
            for tool in body.get("tools") or []
            if isinstance(tool, dict) and tool.get("name")
        ],
    )


def openai_completion(conversation: Conversation, answer: Answer, input_tokens: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text if not answer.tool_calls else None}
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id(conversation.body_key, i),
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for i, c in enumerate(answer.tool_calls)
        ]
    out = output_tokens(answer)
    return {
        "id": "chatcmpl-" + conversation.body_key[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": conversation.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if answer.tool_calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": input_tokens, "completion_tokens": out, "total_tokens": input_tokens + out},
    }


def openai_chunks(conversation: Conversation, answer: Answer, input_tokens: int) -> Iterator[dict[str, Any]]:
    base = {
        "id": "chatcmpl-" + conversation.body_key[:24],
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": conversation.model,
    }

    def chunk(delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""})
    if answer.tool_calls:
        for i, c in enumerate(answer.tool_calls):
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call_id(conversation.body_key, i),
                            "type": "function",
                            "function": {"name": c["name"], "arguments": ""},
                        }
                    ]
                }
            )
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": json.dumps(c["arguments"])}}]})
        yield chunk({}, "tool_calls")
    else:
        for piece in text_chunks(answer.text):
            yield chunk({"content": piece})
        yield chunk({}, "stop")
    if conversation.include_usage:
        out = output_tokens(answer)
        usage = {"prompt_tokens": input_tokens, "completion_tokens": out, "total_tokens": input_tokens + out}
        yield {**base, "choices": [], "usage": usage}


def anthropic_content(conversation: Conversation, answer: Answer) -> list[dict[str, Any]]:
    if answer.tool_calls:
        return [
            {
                "type": "tool_use",
                "id": "toolu_" + call_id(conversation.body_key, i)[5:],
                "name": c["name"],
                "input": c["arguments"],
            }
            for i, c in enumerate(answer.tool_calls)
        ]
    return [{"type": "text", "text": answer.text}]


def anthropic_message(conversation: Conversation, answer: Answer, input_tokens: int) -> dict[str, Any]:
    return {
        "id": "msg_" + conversation.body_key[:24],
        "type": "message",
        "role": "assistant",
        "model": conversation.model,
        "content": anthropic_content(conversation, answer),
        "stop_reason": "tool_use" if answer.tool_calls else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens(answer)},
    }


def anthropic_events(conversation: Conversation, answer: Answer, input_tokens: int) -> Iterator[dict[str, Any]]:
    start = {**anthropic_message(conversation, answer, input_tokens), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": input_tokens, "output_tokens": 0}
    yield {"type": "message_start", "message": start}
    for i, block in enumerate(anthropic_content(conversation, answer)):
        if block["type"] == "text":
            yield {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}
            for piece in text_chunks(block["text"]):
                yield {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": piece}}
        else:
            yield {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}
            partial = json.dumps(block["input"])
            yield {
                "type": "content_block_delta",
                "index": i,
                "delta": {"type": "input_json_delta", "partial_json": partial},
            }
        yield {"type": "content_block_stop", "index": i}
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use" if answer.tool_calls else "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": output_tokens(answer)},
    }
    yield {"type": "message_stop"}


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return str(status)


# --- HTTP -------------------------------------------------------------------------------------------------


class LLMRequestHandler(BaseHTTPRequestHandler):
    server: LLMServer
    server_version = "DexLLM/1"
    # HTTP/1.0: one request per connection and a stream ends when the connection does; simple and robust.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/_stats":
            self.send_json(200, self.server.stats())
        elif path == "/v1/models":
            seen = set(self.server.stats()["by_model"])
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "dex"} for m in sorted({*MODELS, *seen})]
            self.send_json(200, {"object": "list", "data": models})
        elif path in ("", "/health"):
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": {"message": f"no route {path}", "type": "not_found_error"}})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/_reset":
            self.server.reset()
            self.send_json(200, {"ok": True})
            return
        if path not in ("/v1/chat/completions", "/v1/messages"):
            self.send_json(404, {"error": {"message": f"no route {path}", "type": "not_found_error"}})
            return
        anthropic = path == "/v1/messages"
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("messages"), list):
                raise ValueError("model and messages are required")
        except ValueError as exc:
            self.send_error_json(400, f"bad request: {exc}", anthropic=anthropic)
            return
        key = body_key(path, body)
        conversation = anthropic_conversation(body, key) if anthropic else openai_conversation(body, key)
        answer = self.server.answer(conversation)
        if answer.delay:
            time.sleep(answer.delay)
        self.server.record(conversation.model, answer.status)
        if answer.status != 200:
            headers = {"Retry-After": f"{answer.retry_after:g}"} if answer.retry_after is not None else {}
            self.send_error_json(answer.status, answer.error, anthropic=anthropic, headers=headers)
            return
        input_tokens = word_count(*conversation.texts())
        if anthropic:
            if conversation.stream:
                self.send_events(anthropic_events(conversation, answer, input_tokens), answer, named=True)
            else:
                self.send_json(200, anthropic_message(conversation, answer, input_tokens))
        elif conversation.stream:
            self.send_events(openai_chunks(conversation, answer, input_tokens), answer, named=False)
        else:
            self.send_json(200, openai_completion(conversation, answer, input_tokens))

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, *, anthropic: bool, headers: dict | None = None) -> None:
        if anthropic:
            kind = ANTHROPIC_ERROR_TYPES.get(status, "overloaded_error" if status in (503, 529) else "api_error")
            payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            kind = OPENAI_ERROR_TYPES.get(status, "server_error")
            payload = {"error": {"message": message, "type": kind, "code": status_phrase(status)}}
        self.send_json(status, payload, headers)

    def send_events(self, events: Iterator[dict[str, Any]], answer: Answer, *, named: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for event in events:
                prefix = f"event: {event['type']}\n" if named else ""
                self.wfile.write(f"{prefix}data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                if answer.chunk_delay:
                    time.sleep(answer.chunk_delay)
            if not named:
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading; nothing to tell it
