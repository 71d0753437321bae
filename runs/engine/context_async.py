"""The context of an `async def` task."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async

from runs.engine.context import RunContext
from runs.engine.errors import RunTimedOut
from runs.engine.hooks import async_ai_for, trace_step_running
from runs.models import StepKind
from runs.sdk import Retry, StepTimeout, Task

log = logging.getLogger(__name__)


class AsyncRunContext:
    """The context of an `async def` task: the same contract, with awaitable steps."""

    def __init__(self, sync_ctx: RunContext):
        self._sync = sync_ctx
        self.log = sync_ctx.log
        self.ai = async_ai_for(sync_ctx.ai)

    run_id = property(lambda self: self._sync.run_id)
    task_id = property(lambda self: self._sync.task_id)
    attempt = property(lambda self: self._sync.attempt)
    cancelled = property(lambda self: self._sync.cancelled)
    code_version = property(lambda self: self._sync.code_version)

    def patched(self, id: str) -> bool:
        return self._sync.patched(id)

    def set_metadata(self, key: str, value: Any) -> None:
        self._sync.set_metadata(key, value)

    async def step(
        self,
        id: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        compensate: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        ctx = self._sync
        plan = await sync_to_async(ctx._step_begin)(id, kind=StepKind.STEP, retry=retry, timeout=timeout)
        if plan.memoized:
            return plan.output
        budget, is_run_budget = ctx._effective_timeout(plan)
        ctx._step_attempt = plan.attempt
        started = time.monotonic()
        try:
            with ctx._scope(plan.key), trace_step_running(ctx, plan):
                if inspect.iscoroutinefunction(fn):
                    value = await asyncio.wait_for(fn(*args, **kwargs), budget)
                else:
                    value = await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), budget)
            if budget is not None and time.monotonic() - started > budget:
                raise TimeoutError()
        except TimeoutError:
            ctx._step_attempt = None
            if is_run_budget:
                ctx._timed_out = True
                ctx._halt(RunTimedOut())
            exc = StepTimeout(f"step {plan.key!r} ran past its timeout of {budget:g}s")
            return await sync_to_async(ctx._step_failed)(plan, exc)
        except Exception as exc:
            ctx._step_attempt = None
            return await sync_to_async(ctx._step_failed)(plan, exc)
        ctx._step_attempt = None
        return await sync_to_async(ctx._step_succeeded)(plan, value)

    async def transaction(self, id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await sync_to_async(self._sync.transaction)(id, fn, *args, **kwargs)

    async def sleep(self, id: str, duration: timedelta | float) -> None:
        await sync_to_async(self._sync.sleep)(id, duration)

    async def sleep_until(self, id: str, when: datetime) -> None:
        await sync_to_async(self._sync.sleep_until)(id, when)

    async def wait_for_event(self, id: str, **kwargs: Any) -> Any:
        return await sync_to_async(self._sync.wait_for_event)(id, **kwargs)

    async def wait_for_approval(self, id: str, **kwargs: Any) -> dict | None:
        return await sync_to_async(self._sync.wait_for_approval)(id, **kwargs)

    async def invoke(self, id: str, task: Task | str, payload: dict | None = None) -> Any:
        return await sync_to_async(self._sync.invoke)(id, task, payload)

    async def map(self, id: str, task: Task | str, payloads: list[dict]) -> list[Any]:
        return await sync_to_async(self._sync.map)(id, task, payloads)
