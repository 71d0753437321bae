"""What the layers above the engine plug in when the app starts (runs.apps.RunsConfig.ready).

The engine imports no Celery task, service, alert, view or agent module: it calls these instead.

- the dispatcher hands a run's wake-up to the broker (runs.tasks registers Celery's);
- "run settled" listeners hear of every run that ended (runs.ops.alerts raises its alerts there);
- the AI factory builds `ctx.ai` for a run context (runs.ai.steps);
- a tracer hears of every run created, every execution and every step attempt (runs.integrations.otel, when the
  OTEL_* variables are set); with none registered each trace_* call below is one `is None` test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

# (run id, queue, priority) → None. Raising means the broker is unreachable; the caller logs it.
Dispatcher = Callable[[str, str, int], None]
RunSettledListener = Callable[[UUID, str], None]

_dispatcher: Dispatcher | None = None
_run_settled: list[RunSettledListener] = []
_ai_factories: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None
_tracer: Tracer | None = None


class HookMissing(RuntimeError):
    """The engine needs something the app never plugged in (the runs app isn't installed or ready)."""


def set_dispatcher(dispatcher: Dispatcher) -> None:
    global _dispatcher
    _dispatcher = dispatcher


def dispatcher() -> Dispatcher:
    if _dispatcher is None:
        raise HookMissing("no run dispatcher is registered: is the `runs` app in INSTALLED_APPS and ready?")
    return _dispatcher


def on_run_settled(listener: RunSettledListener) -> RunSettledListener:
    """Call `listener(run_id, status)` after every run settles (committed). Registering twice is a no-op."""
    if listener not in _run_settled:
        _run_settled.append(listener)
    return listener


def run_settled(run_id: UUID, status: str) -> None:
    """Tell the listeners a run settled. A listener's failure is logged, never raised into the engine."""
    for listener in _run_settled:
        try:
            listener(run_id, status)
        except Exception:
            log.exception("run %s: a run-settled listener (%r) failed", run_id, listener)


def set_ai_factory(sync: Callable[[Any], Any], async_: Callable[[Any], Any]) -> None:
    """`sync(ctx)` builds `ctx.ai` for a RunContext (given as `Any`: hooks sit below the context); `async_(ctx.ai)`
    its async twin."""
    global _ai_factories
    _ai_factories = (sync, async_)


def ai_for(ctx: Any) -> Any:
    if _ai_factories is None:
        return _NoAI()
    return _ai_factories[0](ctx)


def async_ai_for(sync_ai: Any) -> Any:
    if _ai_factories is None or isinstance(sync_ai, _NoAI):
        return _NoAI()
    return _ai_factories[1](sync_ai)


class _NoAI:
    def __getattr__(self, name: str) -> Any:
        raise HookMissing("ctx.ai is not available: runs.ai registers it when the `runs` app is ready")


# --- tracing ------------------------------------------------------------------------------------------------


class Tracer:
    """What a tracing integration implements. `ctx` is the RunContext and `plan` the StepPlan of the attempt
    (given as `Any`: hooks sit below the context). Only executed attempts are reported: a memoised step
    replayed from the record is not a step start, so a tracer never shows it twice."""

    def run_trace_context(self, *, task_id: str, parent_id: Any) -> dict | None:
        """The trace context (a W3C `traceparent` carrier) to store on a run being created: its executions
        continue that trace, wherever and however often they run."""
        return None

    def execution_started(self, ctx: Any) -> None: ...

    def execution_ended(self, ctx: Any, status: str | None) -> None:
        """`status` is what run_execute left the run in (None: not ours any more, e.g. the lease was lost)."""

    def step_started(self, ctx: Any, plan: Any) -> None: ...

    def step_running(self, ctx: Any, plan: Any) -> AbstractContextManager[Any]:
        """Entered around the step's own function, so what it does is traced inside the step."""
        return nullcontext()

    def step_ended(
        self, ctx: Any, plan: Any, status: str, *, error: BaseException | None = None, meta: dict | None = None
    ) -> None:
        """`status`: completed, retrying (this attempt failed; another follows) or failed."""


_NO_SCOPE = nullcontext()


def set_tracer(tracer: Tracer | None) -> None:
    global _tracer
    _tracer = tracer


# The engine calls these. A tracer's failure is logged and never raised into the engine: tracing a run must
# not be able to fail it.


def trace_run_context(*, task_id: str, parent_id: Any) -> dict | None:
    if _tracer is None:
        return None
    try:
        return _tracer.run_trace_context(task_id=task_id, parent_id=parent_id)
    except Exception:
        log.exception("tracer %r failed on a run's creation", _tracer)
        return None


def trace_execution_started(ctx: Any) -> None:
    if _tracer is not None:
        _call(_tracer.execution_started, ctx)


def trace_execution_ended(ctx: Any, status: str | None) -> None:
    if _tracer is not None:
        _call(_tracer.execution_ended, ctx, status)


def trace_step_started(ctx: Any, plan: Any) -> None:
    if _tracer is not None:
        _call(_tracer.step_started, ctx, plan)


def trace_step_running(ctx: Any, plan: Any) -> AbstractContextManager[Any]:
    if _tracer is None:
        return _NO_SCOPE
    try:
        return _tracer.step_running(ctx, plan)
    except Exception:
        log.exception("tracer %r failed", _tracer)
        return _NO_SCOPE


def trace_step_ended(
    ctx: Any, plan: Any, status: str, *, error: BaseException | None = None, meta: dict | None = None
) -> None:
    if _tracer is not None:
        _call(_tracer.step_ended, ctx, plan, status, error=error, meta=meta)


def _call(method: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        method(*args, **kwargs)
    except Exception:
        log.exception("tracer %r failed in %s", _tracer, getattr(method, "__name__", method))
