"""Durable OpenAI Agents SDK runs: `run_agent(ctx, agent, input)`, in the image of Temporal's plugin.

    from agents import Agent, function_tool
    from runs.integrations.openai_agents import run_agent
    from runs.sdk import task

    billing = Agent(name="billing", instructions="...", tools=[refund])
    triage = Agent(name="triage", instructions="...", handoffs=[billing])

    @task("support")
    def support(ctx, question: str) -> str:
        return run_agent(ctx, triage, question).final_output

`run_agent` runs the agent with `Runner.run` on copies of the agent graph in which

- each model call is a step of kind `ai` (`<agent>:model`, `<agent>:model#1`, ...): the response is recorded,
  so a crash, a retry or a fork never asks the model again; its text streams to the run page; usage and cost
  land on the step and the run as `ctx.ai.infer`'s do; the response cache and LLM cassettes answer it;
- each function tool call is a step (`<agent>:<tool>`), and so is each MCP server's tool call: a finished
  tool never runs again for that run (Temporal's plugin runs plain function tools in workflow code and asks
  for activities instead; here every tool is durable as written). A tool's exception goes back to the model
  as the SDK's `failure_error_function` says (by default as an error message, recorded as the step's
  output); with `failure_error_function=None` it fails the step, which retries per the task's `Retry`;
- each handoff is a step (`<agent>:handoff:<target>`), so an `on_handoff` callback runs once.

Tool calls run in the order the model asked for them. Guardrails, input filters and the run loop itself run
again on every execution, on the recorded responses: like the rest of a task's code they must be
deterministic. An agent reached only through a `handoff(...)` object (not listed as an Agent in some
`handoffs=`) is found again after a crash by calling that handoff once more, which repeats its `on_handoff`
callback: list the agent itself, or keep the callback free of side effects.

Models: the agent's own `Model` instances are used as they are; a model *name* (or none: the SDK's default)
goes to the provider Dex routes that name to (runs.ai.providers): the OpenAI Responses API for OpenAI itself,
Chat Completions for an OpenAI-compatible endpoint such as the local test server, which speaks that
protocol. Pass `model_provider=` (or a `run_config` with a provider of your own) to choose otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from pydantic import TypeAdapter

from runs.ai.cassettes import Exchange
from runs.ai.providers import config_for
from runs.ai.steps import Answer, aexchange
from runs.engine import AsyncRunContext, RunContext, current_step_key
from runs.integrations import missing_extra, run_context, stable_repr, unwrap_control_flow
from runs.sdk import NonRetriableError, Retry

try:
    import openai
    from agents import (
        Agent,
        FunctionTool,
        Handoff,
        Model,
        ModelProvider,
        ModelResponse,
        ModelSettings,
        MultiProvider,
        OpenAIProvider,
        RunConfig,
        Runner,
        RunResult,
        Usage,
        handoff,
    )
    from agents.items import TResponseOutputItem
    from agents.mcp import MCPServer
    from agents.models import get_default_model
    from agents.models.interface import ModelTracing
    from mcp.types import CallToolResult
    from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent
    from pydantic_core import to_jsonable_python
except ImportError as exc:
    raise missing_extra("openai-agents", "The OpenAI Agents SDK", exc) from exc

__all__ = ["DexModelProvider", "run_agent"]

API = "openai-agents"
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})

_output_items: TypeAdapter[list[TResponseOutputItem]] = TypeAdapter(list[TResponseOutputItem])


def run_agent(
    ctx: Any,
    agent: Agent[Any],
    input: Any,
    *,
    context: Any = None,
    max_turns: int | None = None,
    run_config: RunConfig | None = None,
    model_provider: ModelProvider | None = None,
    stream: bool = True,
    cache: bool = True,
    model_retry: Retry | None = None,
    tool_retry: Retry | None = None,
    model_timeout: float | timedelta | None = None,
    tool_timeout: float | timedelta | None = None,
    **runner_kwargs: Any,
) -> RunResult:
    """Run `agent` on `input` (`Runner.run`) as part of the Dex run `ctx` belongs to, each model call, tool
    call and handoff a step (see the module docstring). Returns the SDK's `RunResult`.

    `stream`: stream each model call so its text reaches the run page live. `cache`: answer an identical
    request from Dex's response cache. `model_retry` / `tool_retry`, `model_timeout` / `tool_timeout`: the
    steps' policies (default: the task's). Other keyword arguments go to `Runner.run` (`hooks`, ...)."""
    sync_ctx = _sync_context(ctx)
    run_context("run_agent")
    durable = _Durable(
        sync_ctx,
        model_provider=_provider(model_provider, run_config),
        stream=stream,
        cache=cache,
        model_retry=model_retry,
        tool_retry=tool_retry,
        model_timeout=model_timeout,
        tool_timeout=tool_timeout,
    )
    return async_to_sync(durable.run)(agent, input, context, max_turns, run_config, runner_kwargs)


async def arun_agent(ctx: Any, agent: Agent[Any], input: Any, **kwargs: Any) -> RunResult:
    """`run_agent` for an `async def` task: `await arun_agent(ctx, agent, input)`."""
    durable_kwargs = {
        k: kwargs.pop(k)
        for k in ("stream", "cache", "model_retry", "tool_retry", "model_timeout", "tool_timeout")
        if k in kwargs
    }
    run_config = kwargs.pop("run_config", None)
    model_provider = kwargs.pop("model_provider", None)
    run_context("arun_agent")
    durable = _Durable(
        _sync_context(ctx),
        model_provider=_provider(model_provider, run_config),
        **durable_kwargs,
    )
    return await durable.run(
        agent, input, kwargs.pop("context", None), kwargs.pop("max_turns", None), run_config, kwargs
    )


def _provider(model_provider: ModelProvider | None, run_config: RunConfig | None) -> ModelProvider:
    """`model_provider=`, else a run_config's own provider, else Dex's routing. A RunConfig always holds one: its
    default (a plain MultiProvider, OpenAI) is taken for "not chosen"; pass model_provider=MultiProvider() to
    choose it."""
    if model_provider is not None:
        return model_provider
    if run_config is not None and type(run_config.model_provider) is not MultiProvider:
        return run_config.model_provider
    return DexModelProvider()


def _sync_context(ctx: Any) -> RunContext:
    if isinstance(ctx, AsyncRunContext):
        return ctx._sync
    if isinstance(ctx, RunContext):
        return ctx
    raise TypeError(f"run_agent needs the task's ctx, not {type(ctx).__name__}")


class _Durable:
    """One `run_agent` call: the agent graph made durable, and the steps it makes."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        model_provider: ModelProvider,
        stream: bool = True,
        cache: bool = True,
        model_retry: Retry | None = None,
        tool_retry: Retry | None = None,
        model_timeout: float | timedelta | None = None,
        tool_timeout: float | timedelta | None = None,
    ):
        self.ctx = ctx
        self.actx = AsyncRunContext(ctx)
        self.model_provider = model_provider
        self.stream = stream
        self.cache = cache
        self.model_retry = model_retry
        self.tool_retry = tool_retry
        self.model_timeout = model_timeout
        self.tool_timeout = tool_timeout
        self._durable: dict[int, Agent[Any]] = {}  # id(original agent) -> its durable copy
        self._by_name: dict[str, Agent[Any]] = {}  # durable copies by agent name, for handoffs on replay

    async def run(
        self,
        agent: Agent[Any],
        input: Any,
        context: Any,
        max_turns: int | None,
        run_config: RunConfig | None,
        runner_kwargs: dict[str, Any],
    ) -> RunResult:
        starting = self.durable(agent)
        if run_config is not None:
            config = dataclasses.replace(run_config)
        else:
            # The SDK exports its traces to OpenAI with OPENAI_API_KEY; without a key it could only warn about
            # every run (offline, against the local server).
            config = RunConfig(tracing_disabled=not os.environ.get("OPENAI_API_KEY"))
        if config.model is not None:  # a run-wide model override: made durable like an agent's own
            config.model = _DexModel(self, self._inner_model(config.model), agent_name=None)
        config.model_provider = _DurableProvider(self)
        kwargs: dict[str, Any] = {"context": context, "run_config": config, **runner_kwargs}
        if max_turns is not None:
            kwargs["max_turns"] = max_turns
        try:
            return await Runner.run(starting, input, **kwargs)
        except BaseExceptionGroup as group:
            raise unwrap_control_flow(group) from None

    # -- the agent graph ---------------------------------------------------------------------------------
    def durable(self, agent: Agent[Any]) -> Agent[Any]:
        """A copy of `agent` (and of the agents it hands off to) whose model, tools, MCP servers and
        handoffs make steps."""
        if id(agent) in self._durable:
            return self._durable[id(agent)]
        copy = agent.clone()
        self._durable[id(agent)] = copy  # before the handoffs: agents may hand off to each other
        self._by_name.setdefault(agent.name, copy)
        copy.model = _DexModel(self, self._inner_model(agent.model), agent_name=agent.name)
        copy.tools = [self._tool(agent.name, tool) for tool in agent.tools]
        copy.mcp_servers = [_DexMCPServer(server, self, agent.name) for server in agent.mcp_servers]
        copy.handoffs = [self._handoff(agent.name, entry) for entry in agent.handoffs]
        return copy

    def _inner_model(self, model: Any) -> Model:
        if isinstance(model, Model):
            return model
        return self.model_provider.get_model(model)

    def _tool(self, agent_name: str, tool: Any) -> Any:
        if not isinstance(tool, FunctionTool):
            return tool  # hosted tools (web search, ...) run at the provider, inside the model call
        invoke = tool.on_invoke_tool

        async def on_invoke_tool(tool_context: Any, arguments: str) -> Any:
            async def call() -> Any:
                return to_jsonable_python(await invoke(tool_context, arguments), fallback=str)

            return await self.actx.step(
                f"{agent_name}:{tool.name}", call, retry=self.tool_retry, timeout=self.tool_timeout
            )

        return dataclasses.replace(tool, on_invoke_tool=on_invoke_tool)

    def _handoff(self, agent_name: str, entry: Any) -> Handoff:
        if isinstance(entry, Agent):
            target = self.durable(entry)
            entry = handoff(entry)
        else:
            target = None
        invoke = entry.on_invoke_handoff

        async def on_invoke_handoff(run_ctx: Any, input_json: str | None = None) -> Agent[Any]:
            chosen: list[Agent[Any]] = []

            async def call() -> dict[str, Any]:
                agent = await invoke(run_ctx, input_json)
                chosen.append(self.durable(agent))
                return {"agent": agent.name}

            outcome = await self.actx.step(f"{agent_name}:handoff:{entry.agent_name}", call, retry=self.tool_retry)
            if chosen:
                return chosen[0]
            known = target if target is not None else self._by_name.get(outcome["agent"])
            if known is not None:
                return known
            # Recorded, but the target is reachable only through this handoff: ask it again (its
            # on_handoff callback runs again; see the module docstring).
            return self.durable(await invoke(run_ctx, input_json))

        return dataclasses.replace(entry, on_invoke_handoff=on_invoke_handoff)

    # -- model calls -------------------------------------------------------------------------------------
    async def model_step(self, model: Model, agent_name: str | None, request: dict[str, Any], call: Any) -> Any:
        output = await aexchange(
            self.ctx,
            f"{agent_name or 'agent'}:model",
            Exchange(api=API, request=request),
            call,
            model=_model_name(model),
            cache=self.cache,
            stream=self.stream,
            retry=self.model_retry,
            timeout=self.model_timeout,
        )
        return output


class _DurableProvider(ModelProvider):
    """What the runner asks for a model by name (an agent handed a name at run time): made durable."""

    def __init__(self, durable: _Durable):
        self._durable = durable

    def get_model(self, model_name: str | None) -> Model:
        return _DexModel(self._durable, self._durable.model_provider.get_model(model_name), agent_name=None)


class _DexModel(Model):
    """A model whose calls are steps of the Dex run (`<agent>:model`)."""

    def __init__(self, durable: _Durable, wrapped: Model, *, agent_name: str | None):
        self._durable = durable
        self.wrapped = wrapped
        self._agent_name = agent_name

    async def get_response(
        self,
        system_instructions: str | None,
        input: Any,
        model_settings: ModelSettings,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        args = (system_instructions, input, model_settings, tools, output_schema, handoffs, tracing)
        kwargs = {"previous_response_id": previous_response_id, "conversation_id": conversation_id, "prompt": prompt}
        if current_step_key():
            # Inside a step already (an agent used as a tool): that step records the whole nested run.
            return await self.wrapped.get_response(*args, **kwargs)
        request = {
            "model": _model_name(self.wrapped),
            "system_instructions": system_instructions,
            "input": to_jsonable_python(input, fallback=stable_repr),
            "model_settings": model_settings.to_json_dict(),
            "tools": [_tool_json(tool) for tool in tools],
            "output_schema": _output_schema_json(output_schema),
            "handoffs": [_handoff_json(h) for h in handoffs],
            "previous_response_id": previous_response_id,
            "conversation_id": conversation_id,
            "prompt": to_jsonable_python(prompt, fallback=stable_repr),
        }
        stream = self._durable.stream

        async def call(on_text: Any) -> Answer:
            started = time.monotonic()
            try:
                if stream:
                    # Ask for the usage chunk at the end of the stream (the SDK only does so for OpenAI itself):
                    # the step's tokens and cost come from it.
                    settings = model_settings
                    if settings.include_usage is None:
                        settings = dataclasses.replace(settings, include_usage=True)
                    response = await _streamed(self.wrapped, (*args[:2], settings, *args[3:]), kwargs, on_text)
                else:
                    response = await self.wrapped.get_response(*args, **kwargs)
            except openai.APIStatusError as exc:
                if 400 <= exc.status_code < 500 and exc.status_code not in RETRYABLE_STATUSES:
                    raise NonRetriableError(str(exc)) from exc
                raise
            recorded = _response_json(response)
            return Answer(
                response=recorded,
                model=_model_name(self.wrapped),
                provider=type(self.wrapped).__name__,
                input_tokens=response.usage.input_tokens,
                output_tokens=response.usage.output_tokens,
                latency_ms=int((time.monotonic() - started) * 1000),
                attempts=[{"model": _model_name(self.wrapped), "ok": True}],
                text=response_text(recorded),
            )

        output = await self._durable.model_step(self.wrapped, self._agent_name, request, call)
        return _response_from_json(output)

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        # Runner.run_streamed asks for this; a durable run records whole responses (run_agent uses Runner.run).
        raise NonRetriableError("run_agent records whole model responses: use Runner.run, not run_streamed")
        yield  # pragma: no cover

    async def close(self) -> None:
        await self.wrapped.close()


async def _streamed(model: Model, args: tuple, kwargs: dict, on_text: Any) -> ModelResponse:
    """Stream a model call, its text to `on_text`, and assemble the response the runner would."""
    final = None
    async for event in model.stream_response(*args, **kwargs):
        if isinstance(event, ResponseTextDeltaEvent):
            await on_text(event.delta)
        elif isinstance(event, ResponseCompletedEvent):
            final = event.response
        elif getattr(event, "type", None) in ("response.failed", "response.incomplete", "error"):
            raise RuntimeError(f"the model's stream ended with {event.type}: {getattr(event, 'response', event)}")
    if final is None:
        raise RuntimeError("the model's stream ended without a response.completed event")
    usage = final.usage
    return ModelResponse(
        output=list(final.output),
        usage=Usage(
            requests=1,
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
        ),
        response_id=final.id,
    )


class _DexMCPServer(MCPServer):
    """An agent's MCP server whose tool calls are steps (`<agent>:<tool>`). Everything else, the server's
    settings (approval policy, error function, guardrails...) included, is the wrapped server's."""

    def __init__(self, wrapped: MCPServer, durable: _Durable, agent_name: str):
        # No MCPServer.__init__: its defaults would shadow the wrapped server's settings, which __getattr__
        # hands out instead.
        self.wrapped = wrapped
        self._durable = durable
        self._agent_name = agent_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    @property
    def name(self) -> str:
        return self.wrapped.name

    async def connect(self) -> None:
        await self.wrapped.connect()

    async def cleanup(self) -> None:
        await self.wrapped.cleanup()

    async def list_tools(self, *args: Any, **kwargs: Any) -> Any:
        return await self.wrapped.list_tools(*args, **kwargs)

    async def call_tool(self, tool_name: str, arguments: dict[str, Any] | None, *args: Any, **kwargs: Any) -> Any:
        async def call() -> dict[str, Any]:
            result = await self.wrapped.call_tool(tool_name, arguments, *args, **kwargs)
            return result.model_dump(mode="json", by_alias=True)

        recorded = await self._durable.actx.step(
            f"{self._agent_name}:{tool_name}", call, retry=self._durable.tool_retry, timeout=self._durable.tool_timeout
        )
        return CallToolResult.model_validate(recorded)

    async def list_prompts(self, *args: Any, **kwargs: Any) -> Any:
        return await self.wrapped.list_prompts(*args, **kwargs)

    async def get_prompt(self, *args: Any, **kwargs: Any) -> Any:
        return await self.wrapped.get_prompt(*args, **kwargs)


# --- what a step records ----------------------------------------------------------------------------------


def _model_name(model: Model) -> str:
    return str(getattr(model, "model", None) or getattr(model, "model_name", None) or type(model).__name__)


def _tool_json(tool: Any) -> dict[str, Any]:
    if isinstance(tool, FunctionTool):
        return {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.params_json_schema,
            "strict": tool.strict_json_schema,
        }
    return {"type": type(tool).__name__, "name": getattr(tool, "name", "")}


def _handoff_json(entry: Handoff) -> dict[str, Any]:
    return {
        "tool_name": entry.tool_name,
        "description": entry.tool_description,
        "parameters": entry.input_json_schema,
        "agent": entry.agent_name,
    }


def _output_schema_json(schema: Any) -> dict[str, Any] | None:
    if schema is None or schema.is_plain_text():
        return None
    return {"name": schema.name(), "schema": schema.json_schema(), "strict": schema.is_strict_json_schema()}


def _response_json(response: ModelResponse) -> dict[str, Any]:
    return {
        "output": [item.model_dump(mode="json", exclude_none=True) for item in response.output],
        "usage": {
            "requests": response.usage.requests,
            "input_tokens": response.usage.input_tokens,
            "output_tokens": response.usage.output_tokens,
            "total_tokens": response.usage.total_tokens,
        },
        "response_id": response.response_id,
    }


def _response_from_json(data: dict[str, Any]) -> ModelResponse:
    usage = data.get("usage") or {}
    return ModelResponse(
        output=_output_items.validate_python(data.get("output") or []),
        usage=Usage(
            requests=int(usage.get("requests") or 1),
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            total_tokens=int(usage.get("total_tokens") or 0),
        ),
        response_id=data.get("response_id"),
    )


def response_text(response: dict[str, Any]) -> str:
    """The visible text of a recorded response: its output messages' text."""
    return "".join(
        str(part.get("text") or "")
        for item in response.get("output") or ()
        if item.get("type") == "message"
        for part in item.get("content") or ()
        if part.get("type") == "output_text"
    )


# --- models Dex is configured with --------------------------------------------------------------------------


class DexModelProvider(ModelProvider):
    """Models by name on the providers Dex routes them to (runs.ai.providers): the OpenAI Responses API for
    OpenAI itself, Chat Completions for an OpenAI-compatible `base_url` (the local test server, a gateway)."""

    def __init__(self) -> None:
        self._providers: dict[tuple[str | None, str], OpenAIProvider] = {}

    def get_model(self, model_name: str | None) -> Model:
        name = model_name or get_default_model()
        config = config_for(name)
        if config.kind != "openai":
            raise NonRetriableError(
                f"run_agent: model {name!r} is routed to a {config.kind!r} provider; the OpenAI Agents SDK speaks "
                "the OpenAI protocols: route it to an OpenAI-compatible endpoint, or pass model_provider="
            )
        key = (config.base_url, config.name)
        if key not in self._providers:
            self._providers[key] = OpenAIProvider(
                api_key=config.api_key(), base_url=config.base_url, use_responses=config.base_url is None
            )
        return self._providers[key].get_model(name)
