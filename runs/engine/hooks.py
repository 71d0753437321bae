"""What the layers above the engine plug in when the app starts (runs.apps.RunsConfig.ready).

The engine imports no Celery task, service, alert, view or agent module: it calls these instead.

- the dispatcher hands a run's wake-up to the broker (runs.tasks registers Celery's);
- "run settled" listeners hear of every run that ended (runs.ops.alerts raises its alerts there);
- the AI factory builds `ctx.ai` for a run context (runs.ai.steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

# (run id, queue, priority) → None. Raising means the broker is unreachable; the caller logs it.
Dispatcher = Callable[[str, str, int], None]
RunSettledListener = Callable[[UUID, str], None]

_dispatcher: Dispatcher | None = None
_run_settled: list[RunSettledListener] = []
_ai_factories: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None


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
