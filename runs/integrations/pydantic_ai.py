"""Durable Pydantic AI agents: `DexAgent`, in the image of Pydantic AI's own Temporal and DBOS backends.

    from pydantic_ai import Agent
    from runs.integrations.pydantic_ai import DexAgent
    from runs.sdk import task

    agent = Agent("openai:gpt-5-mini", name="support", output_type=Answer, tools=[lookup_order])
    dex_agent = DexAgent(agent)

    @task("support-agent")
    def support(ctx, question: str) -> dict:
        return dex_agent.run_sync(question).output.model_dump()

Inside a Dex task, `dex_agent.run_sync(...)` / `await dex_agent.run(...)` runs the agent with a capability
attached for that run that makes

- each model request a step of kind `ai` (`<name>:model`, `<name>:model#1`, ...): the response is recorded,
  so a crash, a retry or a fork never asks the model again for a request it answered; its tokens stream to
  the run page as they arrive; usage and cost land on the step and the run as `ctx.ai.infer`'s do; the
  response cache and LLM cassettes (runs.testing) answer it like any LLM step;
- each tool call a step (`<name>:<tool>`), MCP servers' tools included: a finished tool never runs again
  for that run. What a tool tells the model instead of returning (`ModelRetry`, `ToolFailed`, a deferral)
  is recorded as its outcome; an exception fails the step and retries per the task's `Retry`.

Tool calls run one at a time, in the order the model asked for them (a durable run's steps must come in the
same order on every execution). Output validation, history processors and other capabilities run again on
each execution, on the recorded responses: they must be deterministic, like the rest of a task's code.
Structured output and the message history come out the same on every execution. Outside a Dex task the
wrapper is transparent: the agent runs as it would unwrapped.

`dex_model(name)` builds a Pydantic AI model for the provider Dex routes `name` to (`DEX_LLM_PROVIDERS`, the
keys in the environment, or the local test server), so an agent runs offline against `manage.py
llm_server` like `ctx.ai.infer` does.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from asgiref.sync import async_to_sync

from runs.ai.cassettes import Exchange
from runs.ai.providers import config_for
from runs.ai.steps import Answer, aexchange
from runs.engine import AsyncRunContext, RunContext
from runs.integrations import missing_extra, require, run_context, stable_repr, unwrap_control_flow
from runs.sdk import NonRetriableError, Retry

try:
    from pydantic import TypeAdapter
    from pydantic_ai import Agent
    from pydantic_ai.agent import AbstractAgent, AgentRunResult
    from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
    from pydantic_ai.exceptions import (
        ApprovalRequired,
        CallDeferred,
        ModelHTTPError,
        ModelRequestRejectedError,
        ModelRetry,
        SkipToolExecution,
        ToolFailed,
        ToolFailedError,
        ToolRetryError,
    )
    from pydantic_ai.messages import (
        ModelMessage,
        ModelMessagesTypeAdapter,
        ModelRequest,
        ModelResponse,
        PartDeltaEvent,
        PartStartEvent,
        TextPart,
        TextPartDelta,
        ToolReturn,
    )
    from pydantic_ai.models import CompletedStreamedResponse, Model, ModelRequestParameters, StreamedResponse
    from pydantic_ai.models.wrapper import WrapperModel
    from pydantic_ai.settings import ModelSettings
    from pydantic_ai.tools import RunContext as AgentRunContext
    from pydantic_core import to_jsonable_python
except ImportError as exc:
    raise missing_extra("pydantic-ai", "Pydantic AI", exc) from exc

__all__ = ["DexAgent", "dex_model"]

API = "pydantic-ai"
# Fields of Pydantic AI's messages and parts that differ on every execution of the same request (when it
# was made, the agent run's ids) or with where the provider was reached: left out of the request Dex
# records, so a replay, the response cache and a cassette see the same request again.
VOLATILE_FIELDS = frozenset({"timestamp", "run_id", "conversation_id", "provider_url"})
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})

DepsT = TypeVar("DepsT")
OutputT = TypeVar("OutputT")

_response_adapter: TypeAdapter[ModelResponse] = TypeAdapter(ModelResponse)
_tool_return_adapter: TypeAdapter[ToolReturn] = TypeAdapter(ToolReturn)


class DexAgent(Generic[DepsT, OutputT]):
    """A Pydantic AI agent whose runs inside a Dex task are durable (see the module docstring).

    `name` prefixes its step keys (default: the agent's `name`, else "agent"). `stream` streams each model
    request so its text reaches the run page live (the model must support streaming; pass False for one that
    doesn't). `cache` answers an identical request from Dex's response cache. `model_retry` / `tool_retry`
    and `model_timeout` / `tool_timeout` are the steps' policies (default: the task's)."""

    def __init__(
        self,
        agent: AbstractAgent[DepsT, OutputT],
        *,
        name: str | None = None,
        stream: bool = True,
        cache: bool = True,
        model_retry: Retry | None = None,
        tool_retry: Retry | None = None,
        model_timeout: float | timedelta | None = None,
        tool_timeout: float | timedelta | None = None,
    ):
        if not isinstance(agent, AbstractAgent):
            raise TypeError(f"DexAgent wraps a pydantic_ai.Agent, not {type(agent).__name__}")
        self.wrapped = agent
        self.name = name or agent.name or "agent"
        self.stream = stream
        self.cache = cache
        self.model_retry = model_retry
        self.tool_retry = tool_retry
        self.model_timeout = model_timeout
        self.tool_timeout = tool_timeout

    def __repr__(self) -> str:
        return f"<DexAgent {self.name!r} wrapping {self.wrapped!r}>"

    async def run(self, user_prompt: Any = None, **kwargs: Any) -> AgentRunResult[OutputT]:
        """`Agent.run` with each model request and tool call a step of the current Dex run."""
        ctx = run_context("DexAgent.run")
        if ctx is None:
            return await self.wrapped.run(user_prompt, **kwargs)
        capabilities = [*(kwargs.pop("capabilities", None) or ()), _Durability(self, ctx)]
        try:
            with Agent.parallel_tool_call_execution_mode("sequential"):
                return await self.wrapped.run(user_prompt, capabilities=capabilities, **kwargs)
        except BaseExceptionGroup as group:
            raise unwrap_control_flow(group) from None

    def run_sync(self, user_prompt: Any = None, **kwargs: Any) -> AgentRunResult[OutputT]:
        """`Agent.run_sync` with each model request and tool call a step of the current Dex run."""
        if run_context("DexAgent.run_sync") is None:
            return self.wrapped.run_sync(user_prompt, **kwargs)
        # The agent runs on an event loop of asgiref's; the steps' database work comes back to this thread
        # (and its connection), as an async task's steps do.
        return async_to_sync(self.run)(user_prompt, **kwargs)


@dataclass(init=False)
class _Durability(AbstractCapability[Any]):
    """The per-run capability `DexAgent` attaches: model requests and tool calls as steps of `ctx`'s run."""

    def __init__(self, agent: DexAgent, ctx: RunContext):
        self.agent = agent
        self.ctx = ctx
        self.actx = AsyncRunContext(ctx)

    def get_ordering(self) -> CapabilityOrdering:
        # Outermost: a recorded model response or tool outcome stands for everything the other capabilities
        # would do around the call (an instrumentation span, a retry), so a replay repeats none of it.
        return CapabilityOrdering(position="outermost")

    def get_wrapper_model(self, model: Model) -> Model | None:
        return _DexModel(model, self)

    async def wrap_tool_execute(
        self, ctx: AgentRunContext[Any], *, call: Any, tool_def: Any, args: Any, handler: Any
    ) -> Any:
        async def execute() -> dict[str, Any]:
            return await _tool_outcome(handler(args))

        outcome = await self.actx.step(
            f"{self.agent.name}:{call.tool_name}",
            execute,
            retry=self.agent.tool_retry,
            timeout=self.agent.tool_timeout,
        )
        return _tool_result(outcome)

    async def model_step(
        self,
        model: Model,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        parameters: ModelRequestParameters,
        run_context: AgentRunContext[Any] | None,
    ) -> ModelResponse:
        agent = self.agent
        request = {
            "model": f"{model.system}:{model.model_name}",
            "messages": request_messages(messages),
            "model_settings": to_jsonable_python(model_settings or {}, fallback=stable_repr),
            "parameters": to_jsonable_python(parameters, fallback=stable_repr),
        }

        async def call(on_text: Any) -> Answer:
            started = time.monotonic()
            try:
                if agent.stream:
                    response = await _streamed(model, messages, model_settings, parameters, run_context, on_text)
                else:
                    response = await model.request(messages, model_settings, parameters)
            except ModelRequestRejectedError as exc:
                raise NonRetriableError(str(exc)) from exc
            except ModelHTTPError as exc:
                if 400 <= exc.status_code < 500 and exc.status_code not in RETRYABLE_STATUSES:
                    raise NonRetriableError(str(exc)) from exc
                raise
            dumped = _response_adapter.dump_python(response, mode="json")
            return Answer(
                response=dumped,
                model=response.model_name or model.model_name,
                provider=response.provider_name or model.system,
                input_tokens=response.usage.input_tokens or 0,
                output_tokens=response.usage.output_tokens or 0,
                latency_ms=int((time.monotonic() - started) * 1000),
                attempts=[{"model": model.model_name, "provider": model.system, "ok": True}],
                text=response_text(dumped),
            )

        output = await aexchange(
            self.ctx,
            f"{agent.name}:model",
            Exchange(api=API, request=request),
            call,
            model=model.model_name,
            cache=agent.cache,
            stream=agent.stream,
            retry=agent.model_retry,
            timeout=agent.model_timeout,
            estimate_params={"max_tokens": (model_settings or {}).get("max_tokens")},
        )
        return _response_adapter.validate_python(output)


class _DexModel(WrapperModel):
    """The model a durable run sends its requests through: each request is a step (`_Durability.model_step`)."""

    def __init__(self, wrapped: Model, durability: _Durability):
        super().__init__(wrapped)
        self._durability = durability

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        return await self._durability.model_step(self.wrapped, messages, model_settings, model_request_parameters, None)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: AgentRunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        response = await self._durability.model_step(
            self.wrapped, messages, model_settings, model_request_parameters, run_context
        )
        # The step consumed the live stream (its text went to the run page); a streaming consumer here (an
        # event_stream_handler, run_stream) gets the recorded response replayed as events.
        yield CompletedStreamedResponse(response, model_request_parameters=model_request_parameters, replay_events=True)


async def _streamed(
    model: Model,
    messages: list[ModelMessage],
    model_settings: ModelSettings | None,
    parameters: ModelRequestParameters,
    run_context: AgentRunContext[Any] | None,
    on_text: Any,
) -> ModelResponse:
    async with model.request_stream(messages, model_settings, parameters, run_context) as stream:
        async for event in stream:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                await on_text(event.part.content)
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                await on_text(event.delta.content_delta)
    return stream.get()


# --- what a step records ----------------------------------------------------------------------------------


def request_messages(messages: Sequence[ModelMessage]) -> list[dict[str, Any]]:
    """The messages of a request as JSON, without the fields that change on every execution."""
    return _without_volatile(ModelMessagesTypeAdapter.dump_python(list(messages), mode="json"))


def _without_volatile(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    if isinstance(value, dict):
        # Only messages and parts (they carry `kind` / `part_kind`): a tool's arguments keep every key.
        is_message = "kind" in value or "part_kind" in value
        return {k: _without_volatile(v) for k, v in value.items() if not (is_message and k in VOLATILE_FIELDS)}
    return value


def response_text(response: dict[str, Any]) -> str:
    """The visible text of a recorded ModelResponse (its text parts)."""
    return "".join(
        str(part.get("content") or "") for part in response.get("parts") or () if part.get("part_kind") == "text"
    )


async def _tool_outcome(result: Any) -> dict[str, Any]:
    """Run a tool call and say how it ended, as JSON: a step's output, replayed by `_tool_result`."""
    try:
        value = await result
    except SkipToolExecution as exc:
        value = exc.result
    except ModelRetry as exc:
        return {"outcome": "retry", "message": exc.message}
    except ToolFailed as exc:
        return {"outcome": "failed", "message": exc.message}
    except ApprovalRequired as exc:
        return {"outcome": "approval-required", "metadata": to_jsonable_python(exc.metadata, fallback=stable_repr)}
    except CallDeferred as exc:
        return {
            "outcome": "deferred",
            "metadata": to_jsonable_python(exc.metadata, fallback=stable_repr),
            "kind": exc.kind,
        }
    except ToolRetryError as exc:
        return {"outcome": "retry-part", "part": _part_json(exc.tool_retry)}
    except ToolFailedError as exc:
        return {"outcome": "failed-part", "part": _part_json(exc.tool_failed)}
    if isinstance(value, ToolReturn):
        return {"outcome": "tool-return", "value": _tool_return_adapter.dump_python(value, mode="json")}
    return {"outcome": "return", "value": to_jsonable_python(value)}


def _json(value: Any) -> Any:
    return to_jsonable_python(value, fallback=stable_repr)


def _tool_result(outcome: dict[str, Any]) -> Any:
    kind = outcome.get("outcome")
    if kind == "return":
        return outcome["value"]
    if kind == "tool-return":
        return _tool_return_adapter.validate_python(outcome["value"])
    if kind == "retry":
        raise ModelRetry(outcome["message"])
    if kind == "failed":
        raise ToolFailed(outcome["message"])
    if kind == "approval-required":
        raise ApprovalRequired(metadata=outcome.get("metadata"))
    if kind == "deferred":
        raise CallDeferred(metadata=outcome.get("metadata"), kind=outcome.get("kind") or "external")
    if kind == "retry-part":
        raise ToolRetryError(_part_from_json(outcome["part"]))
    if kind == "failed-part":
        raise ToolFailedError(_part_from_json(outcome["part"]))
    raise NonRetriableError(f"a recorded tool outcome Dex can't read: {json.dumps(outcome)[:500]}")


def _part_json(part: Any) -> dict[str, Any]:
    return ModelMessagesTypeAdapter.dump_python([ModelRequest(parts=[part])], mode="json")[0]


def _part_from_json(data: dict[str, Any]) -> Any:
    return ModelMessagesTypeAdapter.validate_python([data])[0].parts[0]


# --- models Dex is configured with --------------------------------------------------------------------------


def dex_model(name: str) -> Model:
    """A Pydantic AI model named `name` on the provider Dex routes it to (runs.ai.providers): an OpenAI or
    OpenAI-compatible endpoint (the local test server included) or Anthropic. The provider's module is
    imported here, when a model needs it (Anthropic's alone takes a second or two to import)."""
    config = config_for(name)
    if config.kind == "anthropic":
        anthropic = require("pydantic_ai.models.anthropic", extra="pydantic-ai", framework="Pydantic AI (Anthropic)")
        provider = require("pydantic_ai.providers.anthropic", extra="pydantic-ai", framework="Pydantic AI (Anthropic)")
        return anthropic.AnthropicModel(
            name, provider=provider.AnthropicProvider(api_key=config.api_key(), base_url=config.base_url)
        )
    openai = require("pydantic_ai.models.openai", extra="pydantic-ai", framework="Pydantic AI (OpenAI)")
    provider = require("pydantic_ai.providers.openai", extra="pydantic-ai", framework="Pydantic AI (OpenAI)")
    return openai.OpenAIChatModel(
        name, provider=provider.OpenAIProvider(base_url=config.base_url, api_key=config.api_key())
    )
