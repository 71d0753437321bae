"""LLM calls as durable steps: `ctx.ai.infer(...)`.

An `infer` is a step of kind `ai`: memoised like any step (a retry, a replay of the run's code or a fork never
asks the model again), answered from the response cache when the identical request was paid for before,
retried on 429/5xx and failed over down `fallbacks` (runs.ai.providers), with its tokens, cost, latency and the
model that answered recorded on the step and its cost added to the run in the step's own commit. Streaming
tokens are published live and stored as chunks as they arrive. A task's `budget_usd` parks the run in an
approval before a call that would pass it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import json
import time
import typing
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pydantic
from asgiref.sync import sync_to_async
from django.db.models import F

from runs import realtime
from runs.ai.cache import TRANSPORT_PARAMS, request_hash
from runs.ai.cassettes import CassetteMismatch, Exchange, current_player, redact_json
from runs.ai.pricing import cost_usd
from runs.ai.providers import AllModelsFailed, Completion, LLMRequest, Router, call_with_failover
from runs.engine import RunTimedOut
from runs.models import LlmCacheEntry, StepChunk, StepKind
from runs.sdk import NonRetriableError, Retry, StepTimeout

if TYPE_CHECKING:
    from runs.engine import RunContext

# runs.testing swaps the providers for a script.
_router_override: contextvars.ContextVar[Router | None] = contextvars.ContextVar("dex_llm_router", default=None)


@contextmanager
def llm_router(router: Router) -> Iterator[None]:
    token = _router_override.set(router)
    try:
        yield
    finally:
        _router_override.reset(token)


class BudgetExceeded(NonRetriableError):
    """An LLM call would pass the run's budget and nobody approved spending more."""


class _ChunkSink:
    """Publishes each streamed delta at once and stores them in small batches (a page opened mid-stream
    reads the stored ones, then follows the live ones). A retry or failover streams again from the start:
    it starts a new attempt, and the page clears what the failed attempt showed.

    With `autoflush=False` (a framework's model streaming on an event loop, where the ORM may not run),
    `add` only publishes and buffers, and the caller flushes from the run's thread when `due()`."""

    FLUSH_SECONDS = 0.25

    def __init__(self, ctx: RunContext, step_key: str, attempt: int, *, autoflush: bool = True):
        self._ctx = ctx
        self._key = step_key
        self.attempt = attempt
        self._autoflush = autoflush
        self._seq = 0
        self._offset = 0  # characters of this attempt published so far
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()

    def add(self, text: str) -> None:
        if not text:
            return
        # The offset lets a page that connected mid-stream skip what its snapshot already showed and notice
        # what was published before it joined but not stored yet (runs.web.consumers reads that back).
        data = {"key": self._key, "text": text, "attempt": self.attempt, "offset": self._offset}
        realtime.publish_now(realtime.RunEvent("token", self._ctx.run_id, data))
        self._offset += len(text)
        self._buffer.append(text)
        if self._autoflush and self.due():
            self.flush()

    def due(self) -> bool:
        return bool(self._buffer) and time.monotonic() - self._last_flush >= self.FLUSH_SECONDS

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        StepChunk.objects.create(
            run_id=self._ctx._claim.run_id,
            step_key=self._key,
            attempt=self.attempt,
            seq=self._seq,
            text="".join(self._buffer),
        )
        self._seq += 1
        self._buffer = []

    def restart(self) -> None:
        self.flush()
        self.attempt += 1
        self._seq = 0
        self._offset = 0
        realtime.publish_now(
            realtime.RunEvent("token", self._ctx.run_id, {"key": self._key, "reset": True, "attempt": self.attempt})
        )

    def sleep_then_restart(self, seconds: float) -> None:
        time.sleep(seconds)
        self.restart()


def _estimate_cost(model: str, messages: Any, params: dict) -> Decimal:
    """A call's cost before it is made: prompt ≈ 4 characters a token, the answer at its max_tokens."""
    prompt_tokens = len(json.dumps(messages, default=str)) // 4 + 1
    answer_tokens = int(params.get("max_tokens") or params.get("max_completion_tokens") or 1024)
    return cost_usd(model, prompt_tokens, answer_tokens)


@dataclass
class Answer:
    """What a provider (or a framework's model) answered to one exchange, in Dex's terms."""

    response: dict[str, Any]  # JSON: what the step stores and returns on every later execution
    model: str  # the model that answered: what the call is priced as
    provider: str
    input_tokens: int
    output_tokens: int
    latency_ms: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""  # the answer's visible text, streamed to the run page when replayed with stream=True


def exchange_hash(exchange: Exchange) -> str:
    """The response-cache key of an exchange. `ctx.ai.infer`'s keeps its historical form (runs.ai.cache)."""
    if exchange.api == "chat":
        request = exchange.request
        params = request.get("params") or {}
        return request_hash(request["model"], request["messages"], params, request.get("tools"))
    text = json.dumps(
        {"v": 1, "api": exchange.api, "request": exchange.request},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _AIStep:
    """One LLM exchange as a step, in the phases every caller shares: `ctx.ai.infer` (synchronous) and the
    framework integrations (whose model calls run on an event loop, with the phases that touch the database
    sent back to the run's thread).

    begin: the budget check, then the step's start; a completed step returns its recorded response.
    recorded: a cassette (when one plays) or the response cache answers without calling anyone.
    succeed / fail: the step settles with usage, cost, the request (redacted) and the response."""

    def __init__(
        self,
        ai: AIContext,
        id: str,
        exchange: Exchange,
        *,
        model: str,
        cache: bool,
        stream: bool,
        retry: Retry | None,
        timeout: float | timedelta | None,
        estimate_params: dict[str, Any] | None = None,
        autoflush: bool = True,
    ):
        self.ai = ai
        self.ctx = ai._ctx
        self.id = id
        self.exchange = exchange
        self.model = model
        self.cache = cache
        self.stream = stream
        self.retry = retry
        self.timeout = timeout
        self.estimate_params = estimate_params or {}
        self.autoflush = autoflush
        self.plan: Any = None
        self.sink: _ChunkSink | None = None
        self.key_hash = ""
        self.player = current_player()

    def begin(self) -> dict[str, Any] | None:
        """Start the step; its recorded output if it completed in an earlier execution."""
        self.ai._check_budget(self.id, self.model, self.exchange.request, self.estimate_params)
        self.plan = self.ctx._step_begin(self.id, kind=StepKind.AI, retry=self.retry, timeout=self.timeout)
        self.exchange.step = self.plan.key
        if self.plan.memoized:
            return self.plan.output
        if self.stream:
            self.sink = _ChunkSink(self.ctx, self.plan.key, self.plan.attempt, autoflush=self.autoflush)
        return None

    def recorded(self) -> dict[str, Any] | None:
        """The step's output answered by a cassette or the response cache, or None: ask the provider."""
        if self.player is not None:
            try:
                tape = self.player.take(self.exchange)
            except CassetteMismatch as exc:
                self.fail(exc)
            if tape is None:
                return None  # recording: the provider answers, `succeed` appends the exchange
            usage = tape.usage
            answer = Answer(
                response=tape.response,
                model=str(usage.get("model") or self.model),
                provider=str(usage.get("provider") or "cassette"),
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                text=_visible_text(self.exchange.api, tape.response),
            )
            self._replay_stream(answer.text)
            return self._settle(answer, source="cassette")
        self.key_hash = exchange_hash(self.exchange)
        if not self.cache:
            return None
        hit = LlmCacheEntry.objects.filter(request_hash=self.key_hash).first()
        if hit is None:
            return None
        LlmCacheEntry.objects.filter(pk=hit.pk).update(hits=F("hits") + 1)
        answer = Answer(
            response=hit.response,
            model=hit.model,
            provider=str(hit.response.get("provider") or (hit.usage or {}).get("provider") or ""),
            input_tokens=int((hit.usage or {}).get("input_tokens") or 0),
            output_tokens=int((hit.usage or {}).get("output_tokens") or 0),
            text=_visible_text(self.exchange.api, hit.response),
        )
        self._replay_stream(answer.text)
        return self._settle(answer, source="cache", saved=hit.cost_usd)

    def _replay_stream(self, text: str) -> None:
        if self.stream and text:
            sink = _ChunkSink(self.ctx, self.plan.key, self.plan.attempt)
            sink.add(text)
            sink.flush()

    def succeed(self, answer: Answer) -> dict[str, Any]:
        if self.sink is not None:
            self.sink.flush()
        if self.player is not None:
            return self._settle(answer, source="recorded")
        cost = cost_usd(answer.model, answer.input_tokens, answer.output_tokens)
        if self.cache:
            LlmCacheEntry.objects.get_or_create(
                request_hash=self.key_hash,
                defaults={
                    "model": answer.model,
                    "response": answer.response,
                    "usage": {
                        "input_tokens": answer.input_tokens,
                        "output_tokens": answer.output_tokens,
                        "provider": answer.provider,
                    },
                    "cost_usd": cost,
                },
            )
        return self._settle(answer, source="provider")

    def _settle(self, answer: Answer, *, source: str, saved: Decimal | None = None) -> dict[str, Any]:
        """Record the step completed with `answer`, its usage and (redacted) exchange; the stored output."""
        ctx = self.ctx
        cached = source == "cache"
        cost = Decimal(0) if cached else cost_usd(answer.model, answer.input_tokens, answer.output_tokens)
        usage = {
            "model": answer.model,
            "provider": answer.provider,
            "input_tokens": answer.input_tokens,
            "output_tokens": answer.output_tokens,
            "cost_usd": str(cost),
            "latency_ms": 0 if cached else answer.latency_ms,
            "cached": cached,
            "request_hash": self.key_hash,
            "attempts": answer.attempts,
        }
        if cached:
            usage["saved_usd"] = str(saved or 0)
        if source in ("cassette", "recorded"):
            usage["cassette"] = "replayed" if source == "cassette" else "recorded"
        exchange = redact_json({"api": self.exchange.api, "request": self.exchange.request})
        # The spend (or, from the cache, the saving) commits with the step's row, before this returns.
        output = ctx._step_succeeded(
            self.plan,
            answer.response,
            meta={"usage": usage, "exchange": exchange},
            cost=None if cached else cost,
            saved=(saved or Decimal(0)) if cached else None,
        )
        if source == "recorded":
            self.player.add(
                Exchange(
                    api=self.exchange.api,
                    request=self.exchange.request,
                    response=answer.response,
                    usage={k: usage[k] for k in ("model", "provider", "input_tokens", "output_tokens", "cost_usd")},
                    step=self.plan.key,
                )
            )
        return output

    def fail(self, exc: BaseException) -> Any:
        if self.sink is not None:
            self.sink.flush()
        return self.ctx._step_failed(self.plan, exc)


def _visible_text(api: str, response: dict[str, Any]) -> str:
    """The text of a recorded response, to show again as the step's token stream."""
    if api == "chat":
        return str(response.get("text") or "")
    return str(response.get("dex_text") or "")


class AIContext:
    """`ctx.ai`: LLM calls as steps."""

    def __init__(self, ctx: RunContext):
        self._ctx = ctx
        # Spending approved beyond the budget by "continue?" approvals consumed so far in this execution.
        self._approved_extra = Decimal(0)

    def infer(
        self,
        id: str,
        *,
        model: str,
        messages: list[dict[str, Any]],
        fallbacks: list[str] | tuple[str, ...] = (),
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        cache: bool = True,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        **params: Any,
    ) -> Completion:
        """Ask `model` (then each of `fallbacks`) and return its Completion (`.text`, `.tool_calls`,
        `.model`...). Recorded as a step: never asked twice for this run."""
        ctx = self._ctx
        request = LLMRequest(model=model, messages=list(messages), tools=tools, params=dict(params))
        exchange = Exchange(
            api="chat",
            request={
                "model": model,
                "fallbacks": list(fallbacks),
                "messages": list(messages),
                "tools": list(tools or []),
                "params": {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS},
            },
        )
        step = _AIStep(
            self,
            id,
            exchange,
            model=model,
            cache=cache,
            stream=stream,
            retry=retry,
            timeout=timeout,
            estimate_params=params,
        )
        memo = step.begin()
        if memo is not None:
            return Completion.from_dict(memo)
        done = step.recorded()
        if done is not None:
            return Completion.from_dict(done)
        sink = step.sink
        attempts: list[dict] = []

        def ask() -> Completion:
            for i, candidate in enumerate([model, *fallbacks]):
                if sink is not None and i > 0:
                    sink.restart()
                try:
                    result = call_with_failover(
                        request,
                        [candidate],
                        stream=stream,
                        on_chunk=sink.add if sink else None,
                        router=_router_override.get(),
                        sleep=sink.sleep_then_restart if sink else time.sleep,
                    )
                except AllModelsFailed as exc:
                    attempts.extend(a.to_dict() for a in exc.attempts)
                    failure = exc
                    continue
                attempts.extend(a.to_dict() for a in result.attempts)
                return result.completion
            if failure.retryable or any(a.get("status") is None for a in attempts):
                raise failure
            raise NonRetriableError(str(failure)) from failure

        try:
            completion = ctx._call_sync(step.plan, ask, (), {})
        except Exception as exc:
            return step.fail(exc)
        answer = Answer(
            response=completion.to_dict(),
            model=completion.model,
            provider=completion.provider,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            latency_ms=completion.latency_ms,
            attempts=attempts,
            text=completion.text,
        )
        return Completion.from_dict(step.succeed(answer))

    def run_tools(
        self,
        id: str,
        *,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[Callable[..., Any]],
        max_turns: int = 8,
        fallbacks: list[str] | tuple[str, ...] = (),
        **params: Any,
    ) -> Completion:
        """A durable tool loop: ask the model; run each tool it calls as its own step; feed the results back;
        until it answers without calling a tool. Every LLM turn and every tool call is a step, so a crash
        mid-loop resumes without asking the model again or re-running a finished tool. Tool schemas come
        from the functions' type hints and docstrings."""
        ctx = self._ctx
        by_name = {fn.__name__: fn for fn in tools}
        schemas = [tool_schema(fn) for fn in tools]
        conversation = list(messages)
        for _turn in range(max_turns):
            answer = self.infer(
                f"{id}:turn", model=model, messages=conversation, tools=schemas, fallbacks=fallbacks, **params
            )
            if not answer.tool_calls:
                return answer
            conversation.append(answer.message())
            for call in answer.tool_calls:
                result = ctx.step(f"{id}:{call['name']}", _call_tool, by_name, call["name"], call["arguments"])
                conversation.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result, default=str)}
                )
        raise NonRetriableError(f"the tool loop {id!r} reached max_turns={max_turns} without a final answer")

    # -- budget ----------------------------------------------------------------------------------------
    def _check_budget(self, id: str, model: str, messages: Any, params: dict) -> None:
        """Before a new call that would pass the budget, park in a "continue?" approval. Replays consume
        recorded approvals in order, so the check is deterministic."""
        ctx = self._ctx
        budget_key = f"budget:{id}"
        n = ctx._key_counts.get(budget_key, 0)
        expected = budget_key if n == 0 else f"{budget_key}#{n}"
        recorded = ctx._recorded[ctx._seq] if ctx._seq < len(ctx._recorded) else None
        base = ctx._claim.budget_usd
        if base is None and ctx._task.budget_usd is not None:
            base = Decimal(str(ctx._task.budget_usd))
        if recorded is not None and recorded.key != expected:
            return  # replaying: the call itself is recorded (memoised), nothing will be spent
        estimate = _estimate_cost(model, messages, params)
        if recorded is None and (base is None or ctx._cost_usd + estimate <= base + self._approved_extra):
            return
        extra = max(estimate * 2, (base or Decimal(0)) / 2, Decimal("0.01")).quantize(Decimal("0.01"))
        answer = ctx.wait_for_approval(
            budget_key,
            prompt=(
                f"Budget exceeded — continue with +${extra}? The run has spent ${ctx._cost_usd:.4f} of its "
                f"${(base or 0) + self._approved_extra:.2f} budget and the next call ({model}) may cost "
                f"up to ${estimate:.4f}."
            ),
        )
        if not answer or not answer.get("approved"):
            raise BudgetExceeded(
                f"the LLM call {id!r} would pass the run's budget of ${(base or 0) + self._approved_extra:.2f} "
                "and spending more was not approved"
            )
        self._approved_extra += extra


OnText = Callable[[str], Awaitable[None]]


async def aexchange(
    ctx: RunContext,
    id: str,
    exchange: Exchange,
    call: Callable[[OnText], Awaitable[Answer]],
    *,
    model: str,
    cache: bool = True,
    stream: bool = False,
    retry: Retry | None = None,
    timeout: float | timedelta | None = None,
    estimate_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An LLM exchange as a step, for a framework whose model calls are coroutines (runs.integrations).

    `call(on_text)` asks the framework's model (awaiting `on_text(delta)` for each piece of streamed text)
    and returns its Answer; it runs on the caller's event loop, under the step's timeout. Everything that
    touches the database runs on the run's own thread (asgiref's `sync_to_async`, thread-sensitive), as an
    async task's `ctx.step` does. Returns the step's output: the answer's `response`, recorded or fresh.
    Raises what the engine raises to park, fail or stop the run (BaseExceptions): let them through.
    """
    step = _AIStep(
        ctx.ai,
        id,
        exchange,
        model=model,
        cache=cache,
        stream=stream,
        retry=retry,
        timeout=timeout,
        estimate_params=estimate_params,
        autoflush=False,
    )
    memo = await sync_to_async(step.begin)()
    if memo is not None:
        return memo
    done = await sync_to_async(step.recorded)()
    if done is not None:
        return done
    sink = step.sink

    async def on_text(text: str) -> None:
        if sink is not None:
            sink.add(text)
            if sink.due():
                await sync_to_async(sink.flush)()

    budget, is_run_budget = ctx._effective_timeout(step.plan)
    ctx._step_attempt = step.plan.attempt
    try:
        with ctx._scope(step.plan.key):
            answer = await asyncio.wait_for(call(on_text), budget)
    except TimeoutError:
        ctx._step_attempt = None
        if is_run_budget:
            ctx._timed_out = True
            ctx._halt(RunTimedOut())  # every later ctx call raises it too (see engine.context)
        exc = StepTimeout(f"step {step.plan.key!r} ran past its timeout of {budget:g}s")
        return await sync_to_async(step.fail)(exc)
    except Exception as exc:
        ctx._step_attempt = None
        return await sync_to_async(step.fail)(exc)
    ctx._step_attempt = None
    return await sync_to_async(step.succeed)(answer)


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool definition of a plain function, from its type hints and docstring."""
    return {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": inspect.getdoc(fn) or fn.__name__,
            "parameters": _arguments_model(fn).model_json_schema(),
        },
    }


def _arguments_model(fn: Callable[..., Any]) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    return pydantic.create_model(f"{fn.__name__}_arguments", **fields)


def _call_tool(by_name: dict[str, Callable[..., Any]], name: str, arguments: Any) -> Any:
    """Run one tool call. A model's mistake (unknown tool, bad arguments) goes back to it as the tool's
    result, so it can correct itself; the tool's own failures fail the step (and retry per policy)."""
    fn = by_name.get(name)
    if fn is None:
        return {"error": f"there is no tool named {name!r}; the tools are: {', '.join(sorted(by_name))}"}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            return {"error": f"the arguments are not valid JSON: {exc}"}
    try:
        validated = _arguments_model(fn).model_validate(arguments or {})
    except pydantic.ValidationError as exc:
        return {"error": f"invalid arguments: {exc.errors(include_url=False, include_input=False)}"}
    return fn(**{name: getattr(validated, name) for name in type(validated).model_fields})


class AsyncAIContext:
    """`ctx.ai` of an async task."""

    def __init__(self, ai: AIContext):
        self._ai = ai

    async def infer(self, id: str, **kwargs: Any) -> Completion:
        return await sync_to_async(self._ai.infer)(id, **kwargs)

    async def run_tools(self, id: str, **kwargs: Any) -> Completion:
        return await sync_to_async(self._ai.run_tools)(id, **kwargs)
