"""Where wake-ups go: the broker, or a test harness's sink."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import transaction

from runs.engine.hooks import HookMissing, dispatcher

log = logging.getLogger(__name__)

# Where wake-ups go: the broker, or a test harness's list (runs.testing).
_enqueue_override: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "dex_enqueue_override", default=None
)


def enqueue(run_id: Any, *, queue: str = "", priority: int = 0) -> None:
    """Hand a wake-up to the broker. A failure only delays the run: the scheduler re-sends stale ones."""
    override = _enqueue_override.get()
    if override is not None:
        override(str(run_id))
        return
    try:
        dispatcher()(str(run_id), queue or settings.DEX_DEFAULT_QUEUE, priority)
    except HookMissing:
        raise
    except Exception:
        log.warning("could not enqueue run %s; the scheduler will re-send it", run_id, exc_info=True)


@contextmanager
def enqueue_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Send wake-ups to `sink` instead of the broker (in-process execution: runs.testing, benchmarks)."""
    token = _enqueue_override.set(sink)
    try:
        yield
    finally:
        _enqueue_override.reset(token)


def enqueue_on_commit(run_id: Any, *, queue: str = "", priority: int = 0) -> None:
    transaction.on_commit(lambda: enqueue(run_id, queue=queue, priority=priority))
