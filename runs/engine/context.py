"""`ctx`: the run context a task receives (DESIGN.md §2), replaying recorded steps and running new ones."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction

from runs import offload, realtime
from runs.engine.codec import encode_output, json_default, now
from runs.engine.create import child_idempotency_key, run_create
from runs.engine.errors import LeaseLost, Parked, RunTimedOut, StepFailedForGood, StepOutputError, error_info
from runs.engine.hooks import ai_for
from runs.engine.lease import Buffer, Claim, StepRecord, fenced_write
from runs.engine.settle import run_park
from runs.engine.waits import waitpoint_outcome
from runs.models import TERMINAL_STATUSES, Run, RunStatus, StepKind, StepStatus
from runs.redact import redact
from runs.sdk import Cancelled, ChildRunFailed, NonDeterminismError, NonRetriableError, Retry, StepTimeout, Task
from runs.sdk.registry import registry

log = logging.getLogger(__name__)

# --- the run context ------------------------------------------------------------------------------------------

current_scope: contextvars.ContextVar[tuple[RunContext, str] | None] = contextvars.ContextVar("dex_scope", default=None)


class _CaptureHandler(logging.Handler):
    """Puts log records emitted while a run's code runs onto that run (and its current step)."""

    def emit(self, record: logging.LogRecord) -> None:
        scope = current_scope.get()
        if scope is None:
            return
        ctx, step_key = scope
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
        except Exception:
            message = str(record.msg)
        ctx._add_log(step_key, record.levelname, message)


_capture_handler = _CaptureHandler()
_capture_installed = False


def install_log_capture() -> None:
    global _capture_installed
    if not _capture_installed:
        logging.getLogger().addHandler(_capture_handler)
        _capture_installed = True


@dataclass
class StepPlan:
    key: str
    seq: int
    kind: str
    attempt: int
    budget_used: int
    retry: Retry
    timeout: float | None
    started: datetime = field(default_factory=now)
    memoized: bool = False
    output: Any = None


class RunContext:
    """The `ctx` a task receives. See DESIGN.md §2 for the contract."""

    def __init__(self, *, claim: Claim, task: Task, steps: list[StepRecord]):
        self._claim = claim
        self._task = task
        self._recorded = steps
        self._seq = 0
        self._key_counts: dict[str, int] = {}
        self._buffer = Buffer()
        self._cancel_requested = claim.cancel_requested
        self._lease_lost = False
        self._timed_out = False
        self._step_attempt: int | None = None
        # A finished step whose commit waits for the next boundary (the next step, a park or the settle),
        # so the last step and the run's end share one commit. Only the task's own code, which must be
        # deterministic and free of side effects, runs in between; a crash there re-runs that one step.
        self._pending: tuple[dict, dict] | None = None
        self._pending_cost: Decimal | None = None  # an LLM step's spend, committed with its row
        # LLM spend not paid again (memoised LLM steps replayed after a failure, cache hits), not yet written.
        self._pending_saved = Decimal(0)
        # This execution resumes a run after a failed attempt (a step retry, or a retry from the dashboard):
        # replaying its LLM steps is spending a naive re-run would have paid again.
        self._after_failure = any(rec.status == StepStatus.RETRYING for rec in steps)
        # LLM spend of this run so far (recorded + this execution's), for budget caps and "saved" figures.
        self._cost_usd: Decimal = claim.cost_usd or Decimal(0)
        # Undo actions of completed steps (compensate=), run newest-first if the run fails for good.
        self._compensations: list[tuple[str, Callable[..., Any], Any]] = []
        self.log = logging.getLogger(f"dex.run.{task.id}")
        self.log.setLevel(logging.DEBUG)
        self.ai = ai_for(self)

    # -- identity ----------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return str(self._claim.run_id)

    @property
    def task_id(self) -> str:
        return self._task.id

    @property
    def attempt(self) -> int:
        """The current step's attempt number (1-based); outside a step, how many times the run started."""
        return self._step_attempt if self._step_attempt is not None else self._claim.executions

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled, timed out or lost its lease: wrap up, no further step starts."""
        return self._cancel_requested or self._lease_lost or self._timed_out

    # -- metadata and logs -------------------------------------------------------------------------------
    def set_metadata(self, key: str, value: Any) -> None:
        """Live progress: pushed at once, stored with the next write (a step's commit or a heartbeat)."""
        json.dumps(value, default=json_default)  # fail here, in the caller's code, if it can't be stored
        with self._buffer.lock:
            self._buffer.metadata[key] = value
        realtime.publish_now(realtime.RunEvent("metadata", self.run_id, {"key": key, "value": value}))

    def _add_log(self, step_key: str, level: str, message: str) -> None:
        # Redacted before it is stored or pushed: steps log requests, and requests carry keys.
        line = {
            "step_key": step_key,
            "ts": now().isoformat(),
            "level": level,
            "message": redact(message[:20200])[:20000],
        }
        with self._buffer.lock:
            self._buffer.logs.append(line)
        realtime.publish_now(realtime.RunEvent("log", self.run_id, line))

    @contextmanager
    def _scope(self, step_key: str) -> Iterator[None]:
        token = current_scope.set((self, step_key))
        try:
            yield
        finally:
            current_scope.reset(token)

    # -- boundaries ----------------------------------------------------------------------------------------
    def _remaining(self) -> float | None:
        if self._task.max_duration is None:
            return None
        used = self._claim.executed_seconds + (time.monotonic() - self._claim.claimed_monotonic)
        return self._task.max_duration - used

    def _check_boundary(self) -> None:
        if self._lease_lost:
            raise LeaseLost()
        if self._cancel_requested:
            raise Cancelled()
        remaining = self._remaining()
        if self._timed_out or (remaining is not None and remaining <= 0):
            raise RunTimedOut()

    def _unique_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise TypeError("a step id must be a non-empty string")
        n = self._key_counts.get(key, 0)
        self._key_counts[key] = n + 1
        return key if n == 0 else f"{key}#{n}"

    def _next_recorded(self, key: str) -> StepRecord | None:
        if self._seq < len(self._recorded):
            rec = self._recorded[self._seq]
            if rec.key != key:
                raise NonDeterminismError(
                    f"step #{self._seq + 1} was recorded as {rec.key!r}, but the code now asks for {key!r}: "
                    "the task's steps must come in the same order on every execution"
                )
            return rec
        return None

    # -- steps -------------------------------------------------------------------------------------------
    def _step_begin(self, key: str, *, kind: str, retry: Retry | None, timeout: float | timedelta | None) -> StepPlan:
        key = self._unique_key(key)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        if rec is not None and rec.status == StepStatus.FAILED:
            # Failed for good in an earlier execution that died before the run settled (while compensating):
            # fail again without running it, so the compensations resume where they stopped.
            self._seq += 1
            raise StepFailedForGood(rec.error or {"type": "StepFailed", "message": f"step {key!r} failed"})
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            if rec.kind == StepKind.AI and self._after_failure:
                self._pending_saved += Decimal(str((rec.meta.get("usage") or {}).get("cost_usd") or 0))
            return StepPlan(
                key,
                rec.seq,
                kind,
                rec.attempts,
                rec.budget_used,
                NO_RETRY_PLAN,
                None,
                memoized=True,
                output=rec.output,
            )
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        plan = StepPlan(
            key=key,
            seq=rec.seq if rec else self._seq,
            kind=kind,
            attempt=(rec.attempts + 1) if rec else 1,
            budget_used=(rec.budget_used + 1) if rec else 1,
            retry=retry or self._task.retry,
            timeout=timeout if timeout is not None else self._task.timeout,
        )
        realtime.publish_now(
            realtime.RunEvent("step", self.run_id, {"key": key, "status": "running", "attempt": plan.attempt})
        )
        return plan

    def _effective_timeout(self, plan: StepPlan) -> tuple[float | None, bool]:
        """The step's time budget and whether it is the run's max_duration (not the step's timeout)."""
        remaining = self._remaining()
        if remaining is not None and (plan.timeout is None or remaining < plan.timeout):
            return max(remaining, 0.001), True
        return plan.timeout, False

    def _step_succeeded(self, plan: StepPlan, value: Any, *, meta: dict | None = None) -> Any:
        try:
            text = encode_output(value, what=f"step {plan.key!r}")
            # A large output goes to the output storage now, before the row that references it commits.
            stored = offload.offload_text(text, run_id=self._claim.run_id)
        except (StepOutputError, offload.OutputStorageError) as exc:
            return self._step_failed(plan, exc)
        finished = now()
        self._pending = (
            step_row(plan, status=StepStatus.COMPLETED, output=stored, finished=finished, meta=meta),
            {
                "key": plan.key,
                "status": "completed",
                "attempt": plan.attempt,
                "duration": (finished - plan.started).total_seconds(),
            },
        )
        self._seq += 1
        # What a replay returns (JSON round-trip), so the first execution sees the same value as later ones.
        return json.loads(text)

    def _flush_pending(self) -> None:
        """Commit the finished step that waits for a boundary (one statement); LeaseLost if we lost the run."""
        if self._pending is None:
            return
        row, event = self._pending
        written = fenced_write(self._claim, self._buffer, step=row, cost=self._pending_cost, saved=self._pending_saved)
        if written is None:
            self._lease_lost = True
            raise LeaseLost()
        self._pending = None
        self._pending_cost = None
        self._pending_saved = Decimal(0)
        self._cancel_requested = self._cancel_requested or written.cancel_requested
        realtime.publish_now(realtime.RunEvent("step", self.run_id, event))

    def _take_pending(self) -> dict[str, Any]:
        """The waiting step (and unwritten figures) as keyword arguments for `run_settle`, which commits them
        with the run's end."""
        saved, self._pending_saved = self._pending_saved, Decimal(0)
        if self._pending is None:
            return {"saved": saved}
        row, event = self._pending
        cost, self._pending, self._pending_cost = self._pending_cost, None, None
        return {"step": row, "step_event": event, "cost": cost, "saved": saved}

    def _step_failed(self, plan: StepPlan, exc: BaseException) -> Any:
        self._flush_pending()
        finished = now()
        info = error_info(exc, step=plan.key)
        attempt_entry = {
            "attempt": plan.attempt,
            "started_at": plan.started.isoformat(),
            "finished_at": finished.isoformat(),
            "error": {k: info[k] for k in ("type", "message", "traceback")},
        }
        retriable = not isinstance(exc, NonRetriableError)
        error = json.dumps(info)
        history = json.dumps([attempt_entry])
        if retriable and plan.budget_used < plan.retry.attempts:
            delay = plan.retry.delay_after(plan.budget_used)
            wake_at = finished + timedelta(seconds=delay)
            self._park(
                step=step_row(
                    plan,
                    status=StepStatus.RETRYING,
                    error=error,
                    history=history,
                    finished=finished,
                    wake_at=wake_at,
                ),
                wake_at=wake_at,
                event={
                    "key": plan.key,
                    "status": "retrying",
                    "attempt": plan.attempt,
                    "error": info["message"],
                    "retry_in": round(delay, 3),
                },
            )
        # Out of attempts (or non-retriable): record the failed step; run_execute runs the compensations
        # (if any) and fails the run.
        failed = step_row(plan, status=StepStatus.FAILED, error=error, history=history, finished=finished)
        if fenced_write(self._claim, self._buffer, step=failed) is None:
            self._lease_lost = True
            raise LeaseLost()
        self._seq += 1
        realtime.publish_now(
            realtime.RunEvent(
                "step",
                self.run_id,
                {"key": plan.key, "status": "failed", "attempt": plan.attempt, "error": info["message"]},
            )
        )
        raise StepFailedForGood(info)

    def _park(
        self,
        *,
        step: dict,
        wake_at: datetime | None,
        event: dict,
        waitpoint: dict | None = None,
        children: Callable[[], list[str]] | None = None,
    ) -> None:
        """Record `step` and set the run waiting until `wake_at`, releasing the lease; raise Parked."""
        saved, self._pending_saved = self._pending_saved, Decimal(0)
        if run_park(
            self._claim,
            self._buffer,
            step=step,
            wake_at=wake_at,
            waitpoint=waitpoint,
            children=children,
            saved=saved,
        ):
            realtime.publish_now(realtime.RunEvent("step", self.run_id, event))
            raise Parked()
        self._lease_lost = True
        raise LeaseLost()

    def _call_sync(self, plan: StepPlan, fn: Callable, args: tuple, kwargs: dict) -> Any:
        budget, is_run_budget = self._effective_timeout(plan)
        self._step_attempt = plan.attempt
        started = time.monotonic()
        try:
            with self._scope(plan.key), alarm(budget):
                value = fn(*args, **kwargs)
                if inspect.isawaitable(value):
                    value = asyncio.run(_awaitable_with_timeout(value, budget))
        except StepTimeout:
            if is_run_budget:
                self._timed_out = True
                raise RunTimedOut() from None
            raise
        finally:
            self._step_attempt = None
        # A step that ignored the alarm (stuck in C code) and came back late: its result is not accepted.
        if budget is not None and time.monotonic() - started > budget:
            if is_run_budget:
                self._timed_out = True
                raise RunTimedOut()
            raise StepTimeout(f"step {plan.key!r} ran past its timeout of {budget:g}s; its result was discarded")
        return value

    def step(
        self,
        id: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        compensate: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `fn(*args, **kwargs)` once per run and return its (stored) JSON result. `compensate(result)`
        is this step's undo: run (as a durable step `compensate:<id>`) if the run later fails for good."""
        return self._step(StepKind.STEP, id, fn, args, kwargs, retry=retry, timeout=timeout, compensate=compensate)

    def _step(
        self,
        kind: str,
        id: str,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        *,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        compensate: Callable[..., Any] | None = None,
    ) -> Any:
        plan = self._step_begin(id, kind=kind, retry=retry, timeout=timeout)
        if plan.memoized:
            result = plan.output
        else:
            try:
                value = self._call_sync(plan, fn, args, kwargs)
            except (Parked, Cancelled, RunTimedOut, StepFailedForGood):
                raise
            except Exception as exc:
                return self._step_failed(plan, exc)
            result = self._step_succeeded(plan, value)
        if compensate is not None:
            self._compensations.append((plan.key, compensate, result))
        return result

    def _compensate(self) -> list[str]:
        """Run the registered compensations newest-first, each a durable step; the keys it undid."""
        undone = []
        for key, fn, result in reversed(self._compensations):
            self._step(StepKind.COMPENSATE, f"compensate:{key}", fn, (result,), {})
            undone.append(key)
        return undone

    # -- child runs -------------------------------------------------------------------------------------
    def invoke(self, id: str, task: Task | str, payload: dict | None = None) -> Any:
        """Start a child run of `task` and park until it finishes; its output, or ChildRunFailed."""
        (outcome,) = self._children(id, StepKind.INVOKE, task, [payload or {}])
        return child_output(outcome)

    def map(self, id: str, task: Task | str, payloads: list[dict]) -> list[Any]:
        """Fan out one child run per payload, park until all finish, fan in their outputs in order.
        Raises ChildRunFailed (naming the first failed child) if any failed."""
        return [child_output(outcome) for outcome in self._children(id, StepKind.MAP, task, list(payloads))]

    def _children(self, id: str, kind: str, task: Task | str, payloads: list[dict]) -> list[dict]:
        task_id = task if isinstance(task, str) else task.id
        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        plan = StepPlan(key, rec.seq if rec else self._seq, kind, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            children = rec.meta.get("children", [])
            outcomes = children_outcomes(children)
            if outcomes is not None:
                self._complete_wait(plan, output=outcomes)
                return outcomes
            # Not all children finished: park again (each child wakes the parent when it ends).
            self._park(
                step=step_row(plan, status=StepStatus.WAITING, finished=None, meta={"children": children}),
                wake_at=None,
                event={"key": key, "status": "waiting", "kind": kind},
            )
        child_task = registry.get(task_id)  # an unknown task fails this run here, with a clear error

        def start_children() -> list[str]:
            ids = []
            for i, payload in enumerate(payloads):
                child, _ = run_create(
                    task=child_task,
                    payload=child_task.validate_payload(payload),
                    parent_id=self._claim.run_id,
                    idempotency_key=child_idempotency_key(self.run_id, key, i),
                )
                ids.append(str(child.id))
            return ids

        if not payloads:
            self._complete_wait(plan, output=[])
            return []
        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None),
            wake_at=None,
            event={"key": key, "status": "waiting", "kind": kind},
            children=start_children,
        )

    # -- durable timers ------------------------------------------------------------------------------
    def sleep(self, id: str, duration: timedelta | float) -> None:
        """Park the run for `duration` (a timedelta or seconds): no worker is held while it sleeps."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        self._sleep(id, lambda: now() + timedelta(seconds=max(seconds, 0)))

    def sleep_until(self, id: str, when: datetime) -> None:
        """Park the run until `when` (an aware datetime)."""
        if when.tzinfo is None:
            raise ValueError("sleep_until needs an aware datetime (with a timezone)")
        self._sleep(id, lambda: when)

    def _sleep(self, id: str, wake_at: Callable[[], datetime]) -> None:
        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        plan = StepPlan(key, rec.seq if rec else self._seq, StepKind.SLEEP, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return
        if rec is not None:
            # Recorded as waiting and the run is executing again: only the timer wakes a sleeping run.
            self._complete_wait(plan, output=None)
            return
        when = wake_at()
        if when <= now():
            self._complete_wait(plan, output=None)
            return
        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=when),
            wake_at=when,
            event={"key": key, "status": "waiting", "kind": StepKind.SLEEP, "wake_at": when.isoformat()},
        )

    # -- waits for an event or a person ------------------------------------------------------------------
    def wait_for_event(
        self, id: str, *, event: str, match: dict | None = None, timeout: timedelta | float | None = None
    ) -> Any:
        """Park until an event named `event` whose data contains `match` arrives (after this wait began);
        return its data, or None after `timeout`."""
        if not event:
            raise ValueError("wait_for_event needs an event name")
        return self._wait(
            id, kind=StepKind.EVENT, timeout=timeout, waitpoint={"event_name": event, "match": match or {}}
        )

    def wait_for_approval(
        self, id: str, *, prompt: str, form: type | None = None, timeout: timedelta | float | None = None
    ) -> dict | None:
        """Park until a person approves or rejects (dashboard, or the API with the waitpoint's token).
        Returns {"approved", "by", "comment", "data"} (data validated by `form`), or None after `timeout`."""
        form_path = f"{form.__module__}.{form.__qualname__}" if form is not None else ""
        return self._wait(id, kind=StepKind.APPROVAL, timeout=timeout, waitpoint={"prompt": prompt, "form": form_path})

    def _wait(self, id: str, *, kind: str, timeout: timedelta | float | None, waitpoint: dict) -> Any:
        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        plan = StepPlan(key, rec.seq if rec else self._seq, kind, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            outcome = waitpoint_outcome(run_id=self._claim.run_id, step_key=key)
            if outcome.done:
                self._complete_wait(plan, output=outcome.result)
                return outcome.result
            # Woken while the wait is still open (a duplicate wake-up): park again on the same waitpoint.
            self._park(
                step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=outcome.timeout_at),
                wake_at=outcome.timeout_at,
                event={"key": key, "status": "waiting", "kind": kind},
            )
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        timeout_at = now() + timedelta(seconds=seconds) if seconds is not None else None
        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=timeout_at, meta=waitpoint),
            wake_at=timeout_at,
            event={"key": key, "status": "waiting", "kind": kind},
            waitpoint={"kind": kind, "step_key": key, "timeout_at": timeout_at, **waitpoint},
        )

    def _complete_wait(self, plan: StepPlan, *, output: Any) -> None:
        finished = now()
        text = offload.offload_text(encode_output(output, what=f"step {plan.key!r}"), run_id=self._claim.run_id)
        self._pending = (
            step_row(plan, status=StepStatus.COMPLETED, output=text, finished=finished),
            {"key": plan.key, "status": "completed", "kind": plan.kind},
        )
        self._seq += 1

    def transaction(self, id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A step whose Django ORM writes commit in the same transaction as its checkpoint: exactly once."""
        plan = self._step_begin(
            id, kind=StepKind.TRANSACTION, retry=kwargs.pop("retry", None), timeout=kwargs.pop("timeout", None)
        )
        if plan.memoized:
            return plan.output
        try:
            with transaction.atomic():
                value = self._call_sync(plan, fn, args, kwargs)
                result = self._step_succeeded(plan, encode_output_checked(value, plan))
                # The checkpoint must commit with the writes, not wait for the next boundary.
                self._flush_pending()
        except (Parked, Cancelled, RunTimedOut, StepFailedForGood):
            raise  # LeaseLost included: the atomic block rolled the writes back with the checkpoint
        except Exception as exc:
            self._pending = None
            return self._step_failed(plan, exc)
        return result


def encode_output_checked(value: Any, plan: StepPlan) -> Any:
    """Raise StepOutputError now (inside the transaction, rolling it back) for an output Dex can't store."""
    encode_output(value, what=f"step {plan.key!r}")
    return value


NO_RETRY_PLAN = Retry(attempts=1)


def step_row(
    plan: StepPlan,
    *,
    status: str,
    finished: datetime | None,
    output: str | None = None,
    error: str | None = None,
    history: str = "[]",
    wake_at: datetime | None = None,
    meta: dict | None = None,
) -> dict:
    return {
        "s_seq": plan.seq,
        "s_key": plan.key,
        "s_kind": plan.kind,
        "s_status": status,
        "s_attempts": plan.attempt,
        "s_budget": plan.budget_used,
        "s_output": output,
        "s_error": error,
        "s_history": history,
        "s_started": plan.started,
        "s_finished": finished,
        "s_wake_at": wake_at,
        "s_meta": json.dumps(meta or {}),
    }


@contextmanager
def alarm(seconds: float | None) -> Iterator[None]:
    """Interrupt the step with StepTimeout after `seconds` (main thread only: SIGALRM)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StepTimeout(f"step ran past its timeout of {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def _awaitable_with_timeout(aw: Any, seconds: float | None) -> Any:
    return await asyncio.wait_for(aw, seconds)


def children_outcomes(children: list[str]) -> list[dict] | None:
    """Each child's {run, status, output, error} in order, or None while any is still unfinished."""
    rows = {str(r["id"]): r for r in Run.objects.filter(pk__in=children).values("id", "status", "output", "error")}
    if len(rows) < len(children) or any(r["status"] not in TERMINAL_STATUSES for r in rows.values()):
        return None
    return [
        {"run": child, "status": rows[child]["status"], "output": rows[child]["output"], "error": rows[child]["error"]}
        for child in children
    ]


def child_output(outcome: dict) -> Any:
    if outcome["status"] == RunStatus.COMPLETED:
        return outcome["output"]
    error = outcome.get("error") or {}
    message = error.get("message") or outcome["status"]
    raise ChildRunFailed(
        f"child run {outcome['run']} ended {outcome['status']}: {message}", run_id=outcome["run"], error=error
    )
