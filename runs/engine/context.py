"""`ctx`: the run context a task receives (DESIGN.md §2), replaying recorded steps and running new ones.

The rules it keeps (DESIGN §3):
- A step's result is committed before `ctx.step` returns, in one fenced statement (the step row, the buffered
  log lines and metadata, the LLM spend): no agent code runs between a step's return and its commit.
- Once the run stops here — it parked, lost its lease, was cancelled or timed out — every later `ctx.*` call
  raises the same signal before doing anything: the agent's `finally:` blocks and context managers run as the
  stack unwinds, but no step runs without the lease and nothing is recorded.
- Agent code outside steps re-runs on every execution; its log lines are stored once per run.
The pauses (sleep, waits, child runs, patches) are in pauses.py.
"""

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
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn

from django.db import transaction

from runs import offload, realtime
from runs.engine.codec import encode_output, json_default, now
from runs.engine.errors import LeaseLost, Parked, RunTimedOut, StepFailedForGood, StepOutputError, error_info
from runs.engine.hooks import ai_for, trace_step_ended, trace_step_running, trace_step_started
from runs.engine.lease import Buffer, Claim, StepRecord, fenced_write
from runs.engine.pauses import Pauses
from runs.engine.plan import NO_RETRY, StepPlan, step_row
from runs.models import StepKind, StepStatus
from runs.redact import redact
from runs.sdk import Cancelled, NonDeterminismError, NonRetriableError, Retry, StepTimeout, Task
from runs.text import describe, find_unstorable, storable

log = logging.getLogger(__name__)

# The signals that stop a run's code where it stands; once one is raised, every ctx call raises it again.
STOPS = (Parked, LeaseLost, Cancelled, RunTimedOut)

# A step's output in a live event is cut to this many characters (the step inspector loads the rest).
OUTPUT_PREVIEW_CHARS = 2048

current_scope: contextvars.ContextVar[tuple[RunContext, str] | None] = contextvars.ContextVar("dex_scope", default=None)


def current_context() -> RunContext | None:
    """The context of the run whose code is executing in this thread or task, or None outside a run.

    For integrations that wrap another framework (runs.integrations) and so are not handed `ctx`: a
    framework's model or tool call reaches the run it belongs to through this.
    """
    scope = current_scope.get()
    return scope[0] if scope is not None else None


def current_step_key() -> str | None:
    """The key of the step executing here ("" in the task's own code between steps), None outside a run."""
    scope = current_scope.get()
    return scope[1] if scope is not None else None


# LLM and HTTP client libraries log every request at INFO ("HTTP Request: POST …/v1/chat/completions"): the LLM
# step already records the call, so below WARNING their lines stay out of the run's logs (their warnings stay in).
QUIET_LOGGERS = frozenset({"httpx", "httpx2", "httpcore", "openai", "anthropic", "urllib3"})


class _CaptureHandler(logging.Handler):
    """Puts log records emitted while a run's code runs onto that run (and its current step)."""

    def emit(self, record: logging.LogRecord) -> None:
        scope = current_scope.get()
        if scope is None:
            return
        if record.levelno < logging.WARNING and record.name.partition(".")[0] in QUIET_LOGGERS:
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


class RunContext(Pauses):
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
        # The signal this execution stopped with (a park, a lost lease, a cancel, a timeout): see STOPS.
        self._stop: BaseException | None = None
        self._step_attempt: int | None = None
        # The step executing now, for the heartbeat to record ({"key", "seq", "attempt", "started_at"}).
        self.inflight: dict | None = None
        # LLM spend not paid again (memoised LLM steps replayed after a failure, cache hits), not yet written.
        self._unwritten_saved = Decimal(0)
        # This execution resumes a run after a failed attempt (a step retry, or a retry from the dashboard):
        # replaying its LLM steps is spending a naive re-run would have paid again.
        self._after_failure = any(rec.status == StepStatus.RETRYING for rec in steps)
        # LLM spend of this run so far (recorded + this execution's), for budget caps and "saved" figures.
        self._cost_usd: Decimal = claim.cost_usd or Decimal(0)
        self._completed = sum(rec.status == StepStatus.COMPLETED for rec in steps)
        # The id of the step row the last write stored: step events name the row by it (runs.realtime).
        self._written_step_id: int | None = None
        # Undo actions of completed steps (compensate=), run newest-first if the run fails for good.
        self._compensations: list[tuple[str, Callable[..., Any], Any]] = []
        # ctx.patched answers, per patch id, for the rest of this execution.
        self._patches: dict[str, bool] = {}
        # Where the next line logged outside steps stands: (before step number, n-th line there).
        self._line_position = (-1, 0)
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

    @property
    def code_version(self) -> str:
        """The version of the code the run started on (DESIGN §2)."""
        return self._claim.code_version

    @property
    def _replaying(self) -> bool:
        """The code is re-running through steps an earlier execution recorded."""
        return self._seq < len(self._recorded)

    # -- stopping ----------------------------------------------------------------------------------------
    def _guard(self) -> None:
        """At the top of every ctx call: a run that stopped here executes and records nothing more."""
        if self._stop is not None:
            raise type(self._stop)()

    def _halt(self, stop: BaseException) -> NoReturn:
        self._stop = stop
        if isinstance(stop, LeaseLost):
            self._lease_lost = True
        raise stop

    # -- metadata and logs -------------------------------------------------------------------------------
    def set_metadata(self, key: str, value: Any) -> None:
        """Live progress: pushed at once, stored with the next write (a step's commit or a heartbeat)."""
        self._guard()
        json.dumps(value, default=json_default)  # fail here, in the caller's code, if it can't be stored
        found = find_unstorable(value, [key])  # (nor can Postgres's jsonb hold a NUL or a lone surrogate)
        if found:
            raise ValueError(f"ctx.set_metadata: {describe(found)}")
        with self._buffer.lock:
            self._buffer.metadata[key] = value
        realtime.publish_now(realtime.RunEvent("metadata", self.run_id, {"key": key, "value": value}))

    def _add_log(self, step_key: str, level: str, message: str) -> None:
        if self._stop is not None:
            return  # unwinding after the run stopped: nothing is recorded
        origin = None
        if not step_key:
            # Agent code outside steps runs again on every execution: a line logged while re-running through
            # recorded steps was stored the first time, and the origin makes the rest count once too.
            if self._replaying:
                return
            seq, n = self._line_position
            self._line_position = (self._seq, n + 1 if seq == self._seq else 1)
            origin = f"{self._seq}.{self._line_position[1]}"
        # Redacted before it is stored or pushed: steps log requests, and requests carry keys.
        line = {
            "step_key": step_key,
            "ts": now().isoformat(),
            "level": level,
            "message": storable(redact(message[:20200])[:20000]),
            "origin": origin,
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
        deadline = self._task.deadline_seconds
        if deadline is None:
            return None
        used = self._claim.executed_seconds + (time.monotonic() - self._claim.claimed_monotonic)
        return deadline - used

    def _check_boundary(self) -> None:
        if self._lease_lost:
            self._halt(LeaseLost())
        if self._cancel_requested:
            self._halt(Cancelled())
        remaining = self._remaining()
        if self._timed_out or (remaining is not None and remaining <= 0):
            self._timed_out = True
            self._halt(RunTimedOut())

    def _unique_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise TypeError("a step id must be a non-empty string")
        n = self._key_counts.get(key, 0)
        self._key_counts[key] = n + 1
        return key if n == 0 else f"{key}#{n}"

    def _next_recorded(self, key: str) -> StepRecord | None:
        while self._seq < len(self._recorded):
            rec = self._recorded[self._seq]
            if rec.key == key:
                return rec
            if rec.kind == StepKind.PATCH:
                self._seq += 1  # a patch the code no longer asks about: nothing to replay
                continue
            raise NonDeterminismError(
                f"step #{self._seq + 1} was recorded as {rec.key!r}, but the code now asks for {key!r}: a task's "
                "steps must come in the same order on every execution. If the task's code changed while this run "
                'was in flight, guard the change with `if ctx.patched("<change id>"): <new code> else: <old '
                "code>`, so runs recorded before it keep their old path (README: Versions)."
            )
        return None

    # -- steps -------------------------------------------------------------------------------------------
    def _step_begin(self, key: str, *, kind: str, retry: Retry | None, timeout: float | timedelta | None) -> StepPlan:
        self._guard()
        key = self._unique_key(key)
        rec = self._next_recorded(key)
        self._check_boundary()
        if rec is not None and rec.status == StepStatus.FAILED:
            # Failed for good in an earlier execution that died before the run settled (while compensating):
            # fail again without running it, so the compensations resume where they stopped.
            self._seq += 1
            raise StepFailedForGood(rec.error or {"type": "StepFailed", "message": f"step {key!r} failed"})
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            if rec.kind == StepKind.AI and self._after_failure:
                self._unwritten_saved += Decimal(str((rec.meta.get("usage") or {}).get("cost_usd") or 0))
            return StepPlan(
                key, rec.seq, kind, rec.attempts, rec.budget_used, NO_RETRY, None, memoized=True, output=rec.output
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
        lost = self._claim.inflight
        if lost and lost.get("key") == key and lost.get("seq") == plan.seq and lost.get("attempt") == plan.attempt:
            # The heartbeat saw this very attempt running, and it never ended: its worker died under it.
            plan.lost.append(
                {
                    "attempt": plan.attempt,
                    "started_at": lost.get("started_at"),
                    "finished_at": None,
                    "error": {
                        "type": "WorkerLost",
                        "message": "the worker executing this attempt died (killed, out of memory or its machine "
                        "lost); the step ran again",
                        "traceback": "",
                    },
                }
            )
            plan.attempt += 1
        self.inflight = {"key": key, "seq": plan.seq, "attempt": plan.attempt, "started_at": plan.started.isoformat()}
        trace_step_started(self, plan)
        self._publish_step(plan, "running")
        return plan

    def _effective_timeout(self, plan: StepPlan) -> tuple[float | None, bool]:
        """The step's time budget and whether it is the run's max_duration (not the step's timeout)."""
        remaining = self._remaining()
        if remaining is not None and (plan.timeout is None or remaining < plan.timeout):
            return max(remaining, 0.001), True
        return plan.timeout, False

    def _step_succeeded(
        self,
        plan: StepPlan,
        value: Any,
        *,
        meta: dict | None = None,
        cost: Decimal | None = None,
        saved: Decimal | None = None,
        publish: bool = True,
    ) -> Any:
        """Commit the step's result now (durable return) and return what a replay would return."""
        try:
            text, stored = self._encode(plan, value)
        except (StepOutputError, offload.OutputStorageError) as exc:
            return self._step_failed(plan, exc)
        return self._commit_success(plan, text, stored, meta=meta, cost=cost, saved=saved, publish=publish)

    def _encode(self, plan: StepPlan, value: Any) -> tuple[str, str]:
        """The output as JSON text, and as stored (a large one goes to the output storage now, before the row
        that references it commits)."""
        text = encode_output(value, what=f"step {plan.key!r}")
        return text, offload.offload_text(text, run_id=self._claim.run_id)

    def _commit_success(
        self,
        plan: StepPlan,
        text: str,
        stored: str,
        *,
        meta: dict | None = None,
        cost: Decimal | None = None,
        saved: Decimal | None = None,
        publish: bool = True,
    ) -> Any:
        finished = now()
        row = step_row(plan, status=StepStatus.COMPLETED, output=stored, finished=finished, meta=meta)
        self._write(row, cost=cost, saved=saved)
        trace_step_ended(self, plan, StepStatus.COMPLETED, meta=meta)
        self._seq += 1
        self._completed += 1
        self.inflight = None
        if cost:
            self._cost_usd += cost
        if publish:
            self._publish_step(plan, "completed", finished=finished, output_text=text, meta=meta)
        # What a replay returns (JSON round-trip), so the first execution sees the same value as later ones.
        return json.loads(text)

    def _write(self, row: dict, *, cost: Decimal | None = None, saved: Decimal | None = None) -> None:
        """One fenced statement: the step row, buffered lines and metadata, spend. LeaseLost if we lost the run."""
        saved = (saved or Decimal(0)) + self._unwritten_saved
        written = fenced_write(self._claim, self._buffer, step=row, cost=cost, saved=saved)
        if written is None:
            self._halt(LeaseLost())
        self._unwritten_saved = Decimal(0)
        self._cancel_requested = self._cancel_requested or written.cancel_requested
        self._written_step_id = written.step_id

    def _step_failed(self, plan: StepPlan, exc: BaseException) -> Any:
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
        history = json.dumps([*plan.lost, attempt_entry])
        self.inflight = None
        will_retry = retriable and plan.budget_used < plan.retry.attempts
        trace_step_ended(self, plan, StepStatus.RETRYING if will_retry else StepStatus.FAILED, error=exc)
        if retriable and plan.budget_used < plan.retry.attempts:
            delay = plan.retry.delay_after(plan.budget_used)
            wake_at = self._claim.now() + timedelta(seconds=delay)
            row = step_row(
                plan, status=StepStatus.RETRYING, error=error, history=history, finished=finished, wake_at=wake_at
            )
            self._park(
                step=row,
                wake_at=wake_at,
                event=self._step_event(plan, "retrying", finished=finished, wake_at=wake_at, error=info["message"]),
            )
        # Out of attempts (or non-retriable): record the failed step; run_execute runs the compensations
        # (if any) and fails the run.
        self._write(step_row(plan, status=StepStatus.FAILED, error=error, history=history, finished=finished))
        self._seq += 1
        self._publish_step(plan, "failed", finished=finished, error=info["message"])
        raise StepFailedForGood(info)

    def _call_sync(self, plan: StepPlan, fn: Callable, args: tuple, kwargs: dict) -> Any:
        budget, is_run_budget = self._effective_timeout(plan)
        self._step_attempt = plan.attempt
        started = time.monotonic()
        try:
            with self._scope(plan.key), alarm(budget), trace_step_running(self, plan):
                value = fn(*args, **kwargs)
                if inspect.isawaitable(value):
                    value = asyncio.run(_awaitable_with_timeout(value, budget))
        except StepTimeout:
            if is_run_budget:
                self._timed_out = True
                self._halt(RunTimedOut())
            raise
        finally:
            self._step_attempt = None
        # A step that ignored the alarm (stuck in C code) and came back late: its result is not accepted.
        if budget is not None and time.monotonic() - started > budget:
            if is_run_budget:
                self._timed_out = True
                self._halt(RunTimedOut())
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
            except (*STOPS, StepFailedForGood):
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
                text, stored = self._encode(plan, value)  # an output Dex can't store rolls the writes back
                result = self._commit_success(plan, text, stored, publish=False)
        except (*STOPS, StepFailedForGood):
            raise  # LeaseLost included: the atomic block rolled the writes back with the checkpoint
        except Exception as exc:
            return self._step_failed(plan, exc)
        self._publish_step(plan, "completed", finished=now(), output_text=text)
        return result

    # -- live events -----------------------------------------------------------------------------------------
    def _step_event(
        self,
        plan: StepPlan,
        status: str,
        *,
        finished: datetime | None = None,
        wake_at: datetime | None = None,
        error: str | None = None,
        output_text: str | None = None,
        meta: dict | None = None,
        children: list[str] | None = None,
    ) -> dict[str, Any]:
        """What changed, for the live views (runs.realtime; the event contract is in realtime.py)."""
        preview = None
        if output_text is not None:
            cut = len(output_text) > OUTPUT_PREVIEW_CHARS
            preview = output_text[:OUTPUT_PREVIEW_CHARS] + ("…" if cut else "")
        return {
            "key": plan.key,
            # The row's id once written (a running step has none yet; a park's event gets it in run_park).
            "id": self._written_step_id if status == "completed" or status == "failed" else None,
            "seq": plan.seq,
            "kind": plan.kind,
            "status": status,
            "attempt": plan.attempt,
            "started_at": plan.started.isoformat(),
            "finished_at": finished.isoformat() if finished else None,
            "wake_at": wake_at.isoformat() if wake_at else None,
            "error": error,
            "duration": (finished - plan.started).total_seconds() if finished else None,
            "output_preview": preview,
            "usage": (meta or {}).get("usage"),
            "children": children,
            "worker_lost": bool(plan.lost),
            "steps_completed": self._completed,
        }

    def _publish_step(self, plan: StepPlan, status: str, **changes: Any) -> None:
        realtime.publish_now(realtime.RunEvent("step", self.run_id, self._step_event(plan, status, **changes)))


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
