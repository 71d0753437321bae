"""Bring your agent framework: durable runs of agents written with Pydantic AI or the OpenAI Agents SDK.

- `runs.integrations.pydantic_ai.DexAgent`: wraps a `pydantic_ai.Agent`; each model request and tool call
  (MCP tools included) of `run_sync` / `run` inside a Dex task is a Dex step.
- `runs.integrations.openai_agents.run_agent(ctx, agent, input)`: runs an `agents.Agent` with each model call,
  tool call and handoff a Dex step.

Each framework is an optional dependency (the `pydantic-ai` and `openai-agents` extras); importing an
integration without its framework raises `MissingExtra`, an ImportError that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from runs.engine import RunContext, current_context, current_step_key


class MissingExtra(ImportError):
    """A framework integration was used without its framework installed."""


def missing_extra(extra: str, framework: str, exc: ImportError) -> MissingExtra:
    return MissingExtra(
        f"{framework} is not installed: install Dex's {extra!r} extra "
        f"(`uv sync --extra {extra}`, or `pip install 'dex[{extra}]'`). ({exc})"
    )


def require(module: str, *, extra: str, framework: str) -> ModuleType:
    """Import `module`, or fail saying which extra of Dex brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(extra, framework, exc) from exc


def run_context(api: str) -> RunContext | None:
    """The run whose task code is calling `api`, or None outside any run. Inside a step's function the
    framework's calls can't be steps of their own: that is a mistake worth a clear error."""
    ctx = current_context()
    if ctx is not None and current_step_key():
        raise RuntimeError(
            f"{api} was called inside the step {current_step_key()!r}: call it from the task's own code, where "
            "each of its model and tool calls becomes a step of the run (steps don't nest)"
        )
    return ctx


def stable_repr(value: object) -> str:
    """How a value JSON can't hold appears in a recorded request: its type, never its address, so the same
    request records the same way on every execution (memoisation keys, the cache and cassettes compare it)."""
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def unwrap_control_flow(group: BaseExceptionGroup) -> BaseException:
    """What to raise for an exception group out of a framework's task group: the engine's control flow
    (park, cancel, lease lost: BaseExceptions) first, so a run parks or stops as it would without the
    framework; else a lone exception as itself; else the group."""
    leaves = list(_leaves(group))
    for exc in leaves:
        if not isinstance(exc, Exception):
            return exc
    return leaves[0] if len(leaves) == 1 else group


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
