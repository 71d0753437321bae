"""LLM providers behind one small interface, model routing from settings, and our retry-then-failover policy.

Requests and messages use the OpenAI chat format (`{"role": "user", "content": "..."}`, assistant `tool_calls`,
`{"role": "tool", "tool_call_id": ..., "content": ...}`); `AnthropicProvider` translates to and from the
Messages API. A `Completion` is plain data (`to_dict()` / `from_dict()`), so a step can store it as JSON.

Routing: `DEX_LLM_PROVIDERS` (a Django setting, else the environment variable of that name, as JSON) maps
provider names to `{"kind": "openai" | "anthropic", "base_url": ..., "api_key_env": ..., "models": [globs]}`;
a model goes to the first provider, in the order given, with a glob that matches it. Without that setting the
providers come from the keys in the environment (`OPENAI_API_KEY` for `gpt-*`/`o*`, `ANTHROPIC_API_KEY` for
`claude-*`), and with no key at all every model goes to the local server (`manage.py llm_server`) at
`DEX_LLM_LOCAL_URL` (default http://127.0.0.1:8090/v1).

API keys are read from the environment when a client is made and are never logged, stored on a config, or put
into an error message or a repr.
"""

from __future__ import annotations

import email.utils
import fnmatch
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

LOCAL_BASE_URL = "http://127.0.0.1:8090/v1"
LOCAL_API_KEY = "dex-local"  # the local server ignores it; the openai SDK refuses to start without one
DEFAULT_TIMEOUT = 120.0
DEFAULT_ANTHROPIC_MAX_TOKENS = 1024  # the Messages API requires max_tokens; OpenAI's has no such need
KINDS = ("openai", "anthropic")
CONFIG_KEYS = {"kind", "base_url", "api_key_env", "models", "timeout"}

OnChunk = Callable[[str], None]


# --- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, ... passed to the API
    timeout: float | None = None  # per HTTP request; the provider's configured timeout when None

    def for_model(self, model: str) -> LLMRequest:
        return LLMRequest(
            model=model, messages=self.messages, tools=self.tools, params=self.params, timeout=self.timeout
        )


@dataclass
class Completion:
    text: str
    tool_calls: list[dict[str, Any]]  # [{"id", "name", "arguments"}]; arguments parsed from JSON when valid
    model: str  # the model name we asked for (one of model + fallbacks): what answered
    provider: str  # the configured provider's name
    input_tokens: int
    output_tokens: int
    latency_ms: int
    finish_reason: str | None  # OpenAI's vocabulary: stop, length, tool_calls, content_filter
    usage: dict[str, Any] = field(default_factory=dict)  # the provider's usage object as it came
    response_model: str = ""  # the model the provider says answered, e.g. a dated snapshot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Completion:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def message(self) -> dict[str, Any]:
        """The assistant message to append to `messages` for the next turn (OpenAI format)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": _arguments_json(call["arguments"])},
                }
                for call in self.tool_calls
            ]
        return message


@dataclass
class Attempt:
    """One HTTP call made by `call_with_failover`: what the ledger records as failed or answered."""

    model: str
    provider: str
    ok: bool
    status: int | None = None  # HTTP status of a failure; None for a connection error or a success
    error: str = ""
    waited: float = 0.0  # seconds slept before the next attempt because of this one (Retry-After or back-off)
    latency_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FailoverResult:
    completion: Completion
    attempts: list[Attempt]


class ProviderError(Exception):
    """A failed provider call, SDK-neutral. The message never contains an API key."""

    def __init__(
        self, message: str, *, status: int | None = None, retryable: bool = False, retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class AllModelsFailed(Exception):
    """Every model in the failover list failed; `attempts` says how."""

    def __init__(self, attempts: list[Attempt]):
        self.attempts = attempts
        last_error = {a.model: a.error for a in attempts if not a.ok}  # one line per model: its last failure
        tried = "; ".join(f"{model}: {error}" for model, error in last_error.items())
        super().__init__(f"every model failed ({tried})")

    @property
    def retryable(self) -> bool:
        """Whether trying again later may help: some failure was a rate limit, a 5xx or a connection error."""
        return any(a.status is None or _retryable_status(a.status) for a in self.attempts)


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str | None = None
    api_key_env: str | None = None  # the *name* of the environment variable holding the key
    models: tuple[str, ...] = ("*",)
    timeout: float = DEFAULT_TIMEOUT

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def api_key(self) -> str:
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.base_url and _is_local(self.base_url):
            return LOCAL_API_KEY
        raise ProviderError(
            f"provider {self.name!r}: environment variable {self.api_key_env or '(api_key_env)'} is not set"
        )


def provider_configs_from(raw: Mapping[str, Any] | str) -> list[ProviderConfig]:
    """Parse a `DEX_LLM_PROVIDERS` value (a dict, or its JSON); fail loudly on anything odd."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ImproperlyConfigured(f"DEX_LLM_PROVIDERS is not valid JSON: {exc}") from exc
    if not isinstance(raw, Mapping) or not raw:
        raise ImproperlyConfigured("DEX_LLM_PROVIDERS must be a non-empty object of provider name -> config")
    configs = []
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ImproperlyConfigured(f"DEX_LLM_PROVIDERS[{name!r}] must be an object")
        unknown = set(entry) - CONFIG_KEYS
        if unknown:
            raise ImproperlyConfigured(f"DEX_LLM_PROVIDERS[{name!r}]: unknown keys {sorted(unknown)}")
        if entry.get("kind") not in KINDS:
            raise ImproperlyConfigured(f"DEX_LLM_PROVIDERS[{name!r}]: kind must be one of {KINDS}")
        models = entry.get("models", ["*"])
        if isinstance(models, str) or not all(isinstance(m, str) for m in models):
            raise ImproperlyConfigured(f"DEX_LLM_PROVIDERS[{name!r}]: models must be a list of globs")
        configs.append(
            ProviderConfig(
                name=name,
                kind=entry["kind"],
                base_url=entry.get("base_url") or None,
                api_key_env=entry.get("api_key_env") or None,
                models=tuple(models),
                timeout=float(entry.get("timeout", DEFAULT_TIMEOUT)),
            )
        )
    return configs


def default_provider_configs(environ: Mapping[str, str] | None = None) -> list[ProviderConfig]:
    """The providers the keys in the environment allow; the local server when there is none."""
    environ = os.environ if environ is None else environ
    configs = []
    if environ.get("OPENAI_API_KEY"):
        configs.append(ProviderConfig("openai", "openai", api_key_env="OPENAI_API_KEY", models=("gpt-*", "o[0-9]*")))
    if environ.get("ANTHROPIC_API_KEY"):
        configs.append(ProviderConfig("anthropic", "anthropic", api_key_env="ANTHROPIC_API_KEY", models=("claude-*",)))
    if not configs:
        configs.append(ProviderConfig("local", "openai", base_url=local_base_url(environ)))
    return configs


def local_base_url(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("DEX_LLM_LOCAL_URL") or LOCAL_BASE_URL


def configured_providers_raw() -> Mapping[str, Any] | str | None:
    return getattr(settings, "DEX_LLM_PROVIDERS", None) or os.environ.get("DEX_LLM_PROVIDERS") or None


def real_provider_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether something other than the default local server is configured (`manage.py dev` asks)."""
    environ = os.environ if environ is None else environ
    explicit = getattr(settings, "DEX_LLM_PROVIDERS", None) or environ.get("DEX_LLM_PROVIDERS")
    return bool(explicit or environ.get("OPENAI_API_KEY") or environ.get("ANTHROPIC_API_KEY"))


def provider_configs() -> list[ProviderConfig]:
    raw = configured_providers_raw()
    return provider_configs_from(raw) if raw else default_provider_configs()


def config_for(model: str) -> ProviderConfig:
    """The configured provider that serves `model` (first match), as the router would pick it: what the
    framework integrations build a framework's own client from."""
    for config in provider_configs():
        if config.serves(model):
            return config
    raise ProviderError(f"no provider configured for model {model!r} (see DEX_LLM_PROVIDERS)")


# --- providers --------------------------------------------------------------------------------------------


class Provider(Protocol):
    name: str

    def complete(self, request: LLMRequest) -> Completion: ...

    def stream(self, request: LLMRequest, on_chunk: OnChunk) -> Completion: ...


class OpenAIProvider:
    """Chat Completions through the official `openai` SDK: OpenAI itself or any compatible server."""

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.name} base_url={self.config.base_url or 'default'}>"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                # max_retries=0: retries are call_with_failover's, so they are counted and recorded.
                self._client = openai.OpenAI(
                    api_key=self.config.api_key(),
                    base_url=self.config.base_url,
                    max_retries=0,
                    timeout=self.config.timeout,
                )
            return self._client

    def _kwargs(self, request: LLMRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": request.model, "messages": request.messages, **request.params}
        if request.tools:
            kwargs["tools"] = openai_tools(request.tools)
        if request.timeout is not None:
            kwargs["timeout"] = request.timeout
        return kwargs

    def complete(self, request: LLMRequest) -> Completion:
        with self._errors():
            client = self.client()
            started = time.monotonic()
            response = client.chat.completions.create(**self._kwargs(request))
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice else None
        usage = response.usage
        return Completion(
            text=(message.content or "") if message else "",
            tool_calls=[
                {"id": call.id, "name": call.function.name, "arguments": _parse_arguments(call.function.arguments)}
                for call in (message.tool_calls or [] if message else [])
                if getattr(call, "function", None) is not None
            ],
            model=request.model,
            provider=self.name,
            input_tokens=(usage.prompt_tokens or 0) if usage else 0,
            output_tokens=(usage.completion_tokens or 0) if usage else 0,
            latency_ms=_ms_since(started),
            finish_reason=choice.finish_reason if choice else None,
            usage=usage.model_dump(exclude_none=True) if usage else {},
            response_model=response.model or "",
        )

    def stream(self, request: LLMRequest, on_chunk: OnChunk) -> Completion:
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage = None
        finish_reason = None
        response_model = ""
        with self._errors():
            client = self.client()
            started = time.monotonic()
            # include_usage: the server sends one last chunk with no choices and the whole usage.
            chunks = client.chat.completions.create(
                **self._kwargs(request), stream=True, stream_options={"include_usage": True}
            )
            for chunk in chunks:
                response_model = chunk.model or response_model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        text.append(delta.content)
                        on_chunk(delta.content)
                    for part in delta.tool_calls or []:
                        call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = part.id or call["id"]
                        if part.function is not None:
                            call["name"] += part.function.name or ""
                            call["arguments"] += part.function.arguments or ""
                    finish_reason = choice.finish_reason or finish_reason
        return Completion(
            text="".join(text),
            tool_calls=[
                {"id": c["id"], "name": c["name"], "arguments": _parse_arguments(c["arguments"])}
                for _, c in sorted(calls.items())
            ],
            model=request.model,
            provider=self.name,
            input_tokens=(usage.prompt_tokens or 0) if usage else 0,
            output_tokens=(usage.completion_tokens or 0) if usage else 0,
            latency_ms=_ms_since(started),
            finish_reason=finish_reason,
            usage=usage.model_dump(exclude_none=True) if usage else {},
            response_model=response_model,
        )

    def _errors(self) -> _SDKErrors:
        import openai

        return _SDKErrors(self, openai.APIStatusError, openai.APIConnectionError)


class AnthropicProvider:
    """The Messages API through the official `anthropic` SDK; OpenAI-format requests are translated."""

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<AnthropicProvider {self.name} base_url={self.config.base_url or 'default'}>"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import anthropic

                self._client = anthropic.Anthropic(
                    api_key=self.config.api_key(),
                    base_url=self.config.base_url,
                    max_retries=0,
                    timeout=self.config.timeout,
                )
            return self._client

    def _kwargs(self, request: LLMRequest) -> dict[str, Any]:
        system, messages = anthropic_messages(request.messages)
        params = dict(request.params)
        if "max_completion_tokens" in params:
            params.setdefault("max_tokens", params.pop("max_completion_tokens"))
        if "stop" in params:
            stop = params.pop("stop")
            params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": params.pop("max_tokens", DEFAULT_ANTHROPIC_MAX_TOKENS),
            **params,
        }
        if system:
            kwargs["system"] = system
        if request.tools:
            kwargs["tools"] = anthropic_tools(request.tools)
        if request.timeout is not None:
            kwargs["timeout"] = request.timeout
        return kwargs

    def _completion(self, request: LLMRequest, message: Any, started: float) -> Completion:
        text = "".join(block.text for block in message.content if block.type == "text")
        tool_calls = [
            {"id": block.id, "name": block.name, "arguments": block.input}
            for block in message.content
            if block.type == "tool_use"
        ]
        return Completion(
            text=text,
            tool_calls=tool_calls,
            model=request.model,
            provider=self.name,
            input_tokens=message.usage.input_tokens or 0,
            output_tokens=message.usage.output_tokens or 0,
            latency_ms=_ms_since(started),
            finish_reason=ANTHROPIC_STOP_REASONS.get(message.stop_reason, message.stop_reason),
            usage=message.usage.model_dump(exclude_none=True),
            response_model=message.model or "",
        )

    def complete(self, request: LLMRequest) -> Completion:
        with self._errors():
            client = self.client()
            started = time.monotonic()
            message = client.messages.create(**self._kwargs(request))
        return self._completion(request, message, started)

    def stream(self, request: LLMRequest, on_chunk: OnChunk) -> Completion:
        with self._errors():
            client = self.client()
            started = time.monotonic()
            with client.messages.stream(**self._kwargs(request)) as stream:
                for text in stream.text_stream:
                    on_chunk(text)
                message = stream.get_final_message()
        return self._completion(request, message, started)

    def _errors(self) -> _SDKErrors:
        import anthropic

        return _SDKErrors(self, anthropic.APIStatusError, anthropic.APIConnectionError)


ANTHROPIC_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
PROVIDER_CLASSES: dict[str, type] = {"openai": OpenAIProvider, "anthropic": AnthropicProvider}


class _SDKErrors:
    """Turn an SDK's status and connection errors into `ProviderError`s, with any key scrubbed out."""

    def __init__(self, provider: Any, status_error: type, connection_error: type):
        self.provider = provider
        self.status_error = status_error
        self.connection_error = connection_error

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None or isinstance(exc, ProviderError):
            return False
        if isinstance(exc, self.status_error):
            status = exc.status_code
            raise ProviderError(
                self._scrub(exc.message),
                status=status,
                retryable=_retryable_status(status),
                retry_after=retry_after_seconds(exc.response.headers),
            ) from None
        if isinstance(exc, self.connection_error):
            raise ProviderError(self._scrub(f"connection error: {exc}"), retryable=True) from None
        return False

    def _scrub(self, text: str) -> str:
        env = self.provider.config.api_key_env
        key = os.environ.get(env) if env else None
        return redact(text, key)


# --- routing and failover ---------------------------------------------------------------------------------


class Router:
    """Model name -> provider, per a list of `ProviderConfig`s (first match wins)."""

    def __init__(self, configs: Sequence[ProviderConfig]):
        self.configs = list(configs)
        self._providers: dict[str, Provider] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | str) -> Router:
        return cls(provider_configs_from(raw))

    def provider_for(self, model: str) -> Provider:
        for config in self.configs:
            if config.serves(model):
                with self._lock:
                    if config.name not in self._providers:
                        self._providers[config.name] = PROVIDER_CLASSES[config.kind](config)
                    return self._providers[config.name]
        raise ProviderError(f"no provider configured for model {model!r} (see DEX_LLM_PROVIDERS)")


_routers: dict[tuple[ProviderConfig, ...], Router] = {}
_routers_lock = threading.Lock()


def default_router() -> Router:
    """The router for the current settings; one per distinct configuration, so clients are reused."""
    configs = tuple(provider_configs())
    with _routers_lock:
        if configs not in _routers:
            _routers[configs] = Router(configs)
        return _routers[configs]


def call_with_failover(
    request: LLMRequest,
    models: Sequence[str] | None = None,
    *,
    stream: bool = False,
    on_chunk: OnChunk | None = None,
    router: Router | None = None,
    retries_per_model: int = 2,
    max_retry_after: float = 30.0,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> FailoverResult:
    """Ask each model in `models` (default: just `request.model`) in turn until one answers.

    Per model: a retryable failure (429, 408, 409, 5xx, connection error) is retried up to `retries_per_model`
    times after the server's Retry-After (capped at `max_retry_after`) or else an exponential back-off from
    `backoff`; any other failure, or running out of retries, moves on to the next model. Every HTTP call is
    an `Attempt`. Raises `AllModelsFailed` (with the attempts) when no model answers.

    With `stream=True`, `on_chunk(text)` is called per delta; a retried or failed-over call streams again
    from the start, so a consumer showing live tokens should clear them when a new attempt begins.
    """
    chosen = router or default_router()
    attempts: list[Attempt] = []
    for model in models or [request.model]:
        attempt_request = request.for_model(model)
        for retry in range(retries_per_model + 1):
            started = time.monotonic()
            provider_name = ""
            try:
                provider = chosen.provider_for(model)
                provider_name = provider.name
                if stream:
                    completion = provider.stream(attempt_request, on_chunk or _ignore)
                else:
                    completion = provider.complete(attempt_request)
            except ProviderError as exc:
                attempt = Attempt(model, provider_name, ok=False, status=exc.status, error=str(exc))
                attempt.latency_ms = _ms_since(started)
                attempts.append(attempt)
                if not exc.retryable or retry == retries_per_model:
                    logger.warning("LLM call to %s failed, moving on: %s", model, exc)
                    break
                attempt.waited = min(
                    exc.retry_after if exc.retry_after is not None else backoff * 2**retry, max_retry_after
                )
                logger.info("LLM call to %s failed (%s); retrying in %.2fs", model, exc, attempt.waited)
                sleep(attempt.waited)
                continue
            attempts.append(Attempt(model, provider_name, ok=True, latency_ms=completion.latency_ms))
            return FailoverResult(completion, attempts)
    raise AllModelsFailed(attempts)


# --- format translation -----------------------------------------------------------------------------------


def openai_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the Chat Completions shape; a bare `{"name", "description", "parameters"}` is wrapped."""
    return [dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)} for tool in tools]


def anthropic_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if "input_schema" in tool:  # already Anthropic's shape
            out.append(dict(tool))
            continue
        function = tool.get("function", tool)
        entry = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object"}}
        if function.get("description"):
            entry["description"] = function["description"]
        out.append(entry)
    return out


def anthropic_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages -> (Anthropic `system`, Anthropic `messages`).

    System messages become the system prompt; assistant tool calls become `tool_use` blocks; `tool` messages
    become `tool_result` blocks in a user turn (consecutive ones share a turn, as the API wants).
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id", ""),
                "content": _text_of(content),
            }
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif role == "assistant" and message.get("tool_calls"):
            blocks: list[dict[str, Any]] = []
            if content:
                blocks.append({"type": "text", "text": _text_of(content)})
            for call in message["tool_calls"]:
                function = call.get("function", call)
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id", ""),
                        "name": function["name"],
                        "input": _parse_arguments(function.get("arguments") or {}),
                    }
                )
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": role, "content": content if isinstance(content, list) else _text_of(content)})
    return "\n\n".join(s for s in system if s), out


# --- helpers ----------------------------------------------------------------------------------------------


_KEY_PATTERN = re.compile(r"\b(sk-(?:ant-)?)[A-Za-z0-9_\-*]{6,}")


def redact(text: str, key: str | None = None) -> str:
    """Remove an API key (and anything shaped like an OpenAI/Anthropic key) from `text`."""
    if key:
        text = text.replace(key, "[redacted]")
    return _KEY_PATTERN.sub(r"\1[redacted]", text)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait per `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(float(value) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)


def _parse_arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments  # kept as the model wrote it; the caller decides what malformed arguments mean


def _arguments_json(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _is_local(base_url: str) -> bool:
    return bool(re.match(r"https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)", base_url))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _ignore(_: str) -> None:
    return None
