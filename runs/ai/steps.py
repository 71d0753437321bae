"""LLM calls as durable steps: `ctx.ai.infer(...)`.

An `infer` is a step of kind `ai`: memoised like any step (a retry, a replay of the run's code or a fork never
asks the model again), answered from the response cache when the identical request was paid for before,
retried on 429/5xx and failed over down `fallbacks` (runs.ai.providers), with its tokens, cost, latency and the
model that answered recorded on the step and its cost added to the run in the step's own commit. Streaming
tokens are published live and stored as chunks as they arrive. A task's `budget_usd` parks the run in an
approval before a call that would pass it.
"""

from __future__ import annotations

import contextvars
import inspect
import json
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pydantic
from asgiref.sync import sync_to_async

from runs import realtime
from runs.ai.cache import request_hash
from runs.ai.pricing import cost_usd
from runs.ai.providers import AllModelsFailed, Completion, LLMRequest, Router, call_with_failover
from runs.models import LlmCacheEntry, StepChunk, StepKind
from runs.sdk import NonRetriableError, Retry

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
    it starts a new attempt, and the page clears what the failed attempt showed."""

    FLUSH_SECONDS = 0.25

    def __init__(self, ctx: RunContext, step_key: str, attempt: int):
        self._ctx = ctx
        self._key = step_key
        self.attempt = attempt
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
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()

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


def _estimate_cost(model: str, messages: list[dict], params: dict) -> Decimal:
    """A call's cost before it is made: prompt ≈ 4 characters a token, the answer at its max_tokens."""
    prompt_tokens = len(json.dumps(messages, default=str)) // 4 + 1
    answer_tokens = int(params.get("max_tokens") or params.get("max_completion_tokens") or 1024)
    return cost_usd(model, prompt_tokens, answer_tokens)


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
        self._check_budget(id, model, messages, params)
        plan = ctx._step_begin(id, kind=StepKind.AI, retry=retry, timeout=timeout)
        if plan.memoized:
            return Completion.from_dict(plan.output)
        request = LLMRequest(model=model, messages=list(messages), tools=tools, params=dict(params))
        key_hash = request_hash(model, messages, params, tools)
        if cache:
            hit = LlmCacheEntry.objects.filter(request_hash=key_hash).first()
            if hit is not None:
                return self._answered_from_cache(plan, hit, stream)
        sink = _ChunkSink(ctx, plan.key, plan.attempt) if stream else None
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
            completion = ctx._call_sync(plan, ask, (), {})
        except Exception as exc:
            if sink is not None:
                sink.flush()
            return ctx._step_failed(plan, exc)
        finally:
            if sink is not None:
                sink.flush()
        cost = cost_usd(completion.model, completion.input_tokens, completion.output_tokens)
        usage = {
            "model": completion.model,
            "provider": completion.provider,
            "input_tokens": completion.input_tokens,
            "output_tokens": completion.output_tokens,
            "cost_usd": str(cost),
            "latency_ms": completion.latency_ms,
            "cached": False,
            "request_hash": key_hash,
            "attempts": attempts,
        }
        if cache:
            LlmCacheEntry.objects.get_or_create(
                request_hash=key_hash,
                defaults={
                    "model": completion.model,
                    "response": completion.to_dict(),
                    "usage": {"input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens},
                    "cost_usd": cost,
                },
            )
        output = ctx._step_succeeded(plan, completion.to_dict(), meta={"usage": usage}, cost=cost)
        return Completion.from_dict(output)

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

    def _answered_from_cache(self, plan: Any, hit: LlmCacheEntry, stream: bool) -> Completion:
        ctx = self._ctx
        LlmCacheEntry.objects.filter(pk=hit.pk).update(hits=hit.hits + 1)
        completion = Completion.from_dict(hit.response)
        if stream and completion.text:
            sink = _ChunkSink(ctx, plan.key, plan.attempt)
            sink.add(completion.text)
            sink.flush()
        usage = {
            "model": completion.model,
            "provider": completion.provider,
            "input_tokens": completion.input_tokens,
            "output_tokens": completion.output_tokens,
            "cost_usd": "0",
            "latency_ms": 0,
            "cached": True,
            "saved_usd": str(hit.cost_usd),
            "request_hash": hit.request_hash,
            "attempts": [],
        }
        output = ctx._step_succeeded(plan, completion.to_dict(), meta={"usage": usage}, saved=hit.cost_usd)
        return Completion.from_dict(output)

    # -- budget ----------------------------------------------------------------------------------------
    def _check_budget(self, id: str, model: str, messages: list[dict], params: dict) -> None:
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
