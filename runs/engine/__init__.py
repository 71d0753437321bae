"""The engine: claim a run under a lease, replay it with memoised steps, and move its state.

Every state change of a run is here, as a conditional UPDATE whose row count says whether it happened
(ENGINE.md). A worker's writes carry its lease token, so a worker that lost its lease (slow, partitioned,
resurrected) changes nothing. The happy path of a step is one statement: prove the lease, extend it, insert
the step's result (and any buffered log lines / metadata) — one commit per step.

The engine is pure of HTTP and sockets: it publishes through runs.realtime and enqueues through a callable.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection, transaction

from runs import offload, realtime
from runs.models import Run, RunStatus, StepKind, StepStatus
from runs.ops import alerts
from runs.redact import redact
from runs.sdk import (
    Cancelled,
    ChildRunFailed,
    NonDeterminismError,
    NonRetriableError,
    Retry,
    StepTimeout,
    Task,
)
from runs.sdk.registry import UnknownTask, registry

log = logging.getLogger(__name__)

# --- control flow -----------------------------------------------------------------------------------------
# BaseExceptions, so an agent's `except Exception:` can't swallow them on their way up to run_execute.


class Parked(BaseException):
    """The run was parked (sleep, wait, retry back-off); the worker returns and holds nothing."""


class LeaseLost(Cancelled):
    """Another worker owns the run now (or it was finished under us): stop without writing anything."""


class RunTimedOut(BaseException):
    """The run used up its max_duration."""


class StepFailedForGood(BaseException):
    """A step failed with no retries left (or non-retriably); the run fails with `error`."""

    def __init__(self, error: dict):
        super().__init__(error.get("message", ""))
        self.error = error


class StepOutputError(NonRetriableError):
    """A step returned something Dex can't store (not JSON, too large)."""


# --- encoding ----------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    import pydantic

    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"a value of type {type(value).__name__} is not JSON-serialisable")


def encode_output(value: Any, *, what: str) -> str:
    """JSON text for a step or run output, or StepOutputError naming `what` (e.g. "step 'plan'")."""
    try:
        text = json.dumps(value, default=_json_default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StepOutputError(f"{what} returned a value that can't be stored as JSON: {exc}") from None
    if "\\u0000" in text:
        raise StepOutputError(f"{what} returned text containing a NUL character, which Postgres can't store")
    limit = settings.DEX_MAX_STEP_OUTPUT_BYTES
    size = len(text.encode())
    if size > limit:
        raise StepOutputError(f"{what} returned {size:,} bytes of JSON, over the limit of {limit:,} bytes")
    return text


def error_info(exc: BaseException, *, step: str | None = None) -> dict:
    message = str(exc) or type(exc).__name__
    # Redacted before it is stored: an exception may quote a key, a password or a bearer token.
    info = {
        "type": type(exc).__name__,
        "message": redact(message),
        "traceback": redact("".join(traceback.format_exception(exc))),
    }
    if step is not None:
        info["step"] = step
    return info


def _now() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# Where wake-ups go: the broker, or a test harness's list (runs.testing).
_enqueue_override: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "dex_enqueue_override", default=None
)


def _enqueue(run_id: Any, *, queue: str = "", priority: int = 0) -> None:
    """Hand a wake-up to the broker. A failure only delays the run: the scheduler re-sends stale ones."""
    override = _enqueue_override.get()
    if override is not None:
        override(str(run_id))
        return
    from runs.engine.flow import broker_priority
    from runs.tasks import execute_run

    try:
        execute_run.apply_async(
            args=[str(run_id)], queue=queue or settings.DEX_DEFAULT_QUEUE, priority=broker_priority(priority)
        )
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
    transaction.on_commit(lambda: _enqueue(run_id, queue=queue, priority=priority))


# --- claim ---------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    run_id: UUID
    task_id: str
    payload: dict
    token: int
    worker: str
    cancel_requested: bool
    executed_seconds: float
    executions: int
    # False only on a run's first execution that isn't a fork: no step can be recorded yet.
    may_have_steps: bool = True
    cost_usd: Decimal = Decimal(0)  # LLM spend recorded so far
    budget_usd: Decimal | None = None  # the run's own cap (an approved "continue?"), over the task's
    claimed_monotonic: float = field(default_factory=time.monotonic)


_CLAIM_RETURNING = """task_id, payload, lease_token, cancel_requested_at IS NOT NULL, executed_seconds, executions,
          replay_of_id IS NOT NULL, cost_usd, budget_usd"""

# A run without flow-control limits is claimed by the UPDATE. A limited one (runs/engine/flow.py) is not: the
# second branch hands back its group (task and keys) for flow.claim_next, still in one round trip.
_CLAIM_SQL = f"""
WITH claimed AS (
  UPDATE runs_run
     SET status = 'running', lease_owner = %(worker)s, lease_token = lease_token + 1,
         lease_expires_at = now() + make_interval(secs => %(lease)s), claimed_at = now(),
         started_at = coalesce(started_at, now()), executions = executions + 1, wake_at = NULL,
         status_reason = ''
   WHERE id = %(run)s AND status = 'queued' AND concurrency_key_value IS NULL AND rate_key_value IS NULL
  RETURNING {_CLAIM_RETURNING})
SELECT true, NULL::text, NULL::text, * FROM claimed
UNION ALL
SELECT false, concurrency_key_value, rate_key_value, task_id, NULL::jsonb, NULL::bigint, NULL::bool,
       NULL::float, NULL::int, NULL::bool, NULL::numeric, NULL::numeric
  FROM runs_run
 WHERE id = %(run)s AND status IN ('queued', 'running')
   AND (concurrency_key_value IS NOT NULL OR rate_key_value IS NOT NULL)
"""


def run_claim(run_id: UUID | str, *, worker: str) -> Claim | None:
    """Take ownership of a queued run with one statement; None if it isn't ours to run (finished, owned by
    another live worker, parked). A run whose worker died is re-queued by the scheduler first.

    A run of a task with concurrency / rate limits takes a second, locked statement (flow.claim_next), which
    may claim a better run of the same group instead — or none, leaving them queued, when a limit is reached.
    """
    with connection.cursor() as cur:
        cur.execute(_CLAIM_SQL, {"run": str(run_id), "worker": worker, "lease": settings.DEX_LEASE_SECONDS})
        row = cur.fetchone()
    if row is None:
        return None
    claimed, ckey, rkey, *row = row
    if not claimed:
        from runs.engine import flow

        task_id = row[0]
        task = registry.get(task_id) if task_id in registry else None
        row = flow.claim_next(
            run_id=run_id,
            task_id=task_id,
            ckey=ckey,
            rkey=rkey,
            task=task,
            worker=worker,
            returning=_CLAIM_RETURNING,
        )
        if row is None:
            return None
        run_id, *row = row
    task_id, payload, token, cancel_requested, executed, executions, is_replay, cost, budget = row
    if isinstance(payload, str):
        payload = json.loads(payload)
    return Claim(
        run_id=UUID(str(run_id)),
        task_id=task_id,
        payload=payload,
        token=token,
        worker=worker,
        cancel_requested=cancel_requested,
        executed_seconds=executed,
        executions=executions,
        may_have_steps=executions > 1 or is_replay,
        cost_usd=cost,
        budget_usd=budget,
    )


# --- the fenced writes of a worker ---------------------------------------------------------------------------

_LEASE_EXTEND = "lease_expires_at = now() + make_interval(secs => %(lease)s)"

_LOGS_CTE = """,
logs AS (
  INSERT INTO runs_logline (run_id, step_key, ts, level, message)
  SELECT lease.id, x.step_key, x.ts, x.level, x.message
    FROM lease, jsonb_to_recordset(%(logs)s::jsonb) AS x(step_key text, ts timestamptz, level text, message text))"""

_STEP_CTE = """,
step AS (
  INSERT INTO runs_step (run_id, seq, key, kind, status, attempts, budget_used, output, error, history,
                         started_at, finished_at, wake_at, meta)
  SELECT lease.id, %(s_seq)s, %(s_key)s, %(s_kind)s, %(s_status)s, %(s_attempts)s, %(s_budget)s, %(s_output)s::jsonb,
         %(s_error)s::jsonb, %(s_history)s::jsonb, %(s_started)s, %(s_finished)s, %(s_wake_at)s, %(s_meta)s::jsonb
    FROM lease
  ON CONFLICT (run_id, key) DO UPDATE
     SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, budget_used = EXCLUDED.budget_used,
         output = EXCLUDED.output, error = EXCLUDED.error, history = runs_step.history || EXCLUDED.history,
         -- A wait keeps the time it began; an attempt after a failure has its own start (history has all).
         started_at = CASE WHEN runs_step.status = 'waiting' THEN runs_step.started_at
                           ELSE EXCLUDED.started_at END,
         finished_at = EXCLUDED.finished_at, wake_at = EXCLUDED.wake_at,
         meta = runs_step.meta || EXCLUDED.meta
   WHERE runs_step.status <> 'completed'
  RETURNING id)"""


@dataclass
class StepRecord:
    seq: int
    key: str
    kind: str
    status: str
    attempts: int
    budget_used: int
    output: Any
    meta: dict
    error: dict | None = None


class _Buffer:
    """Log lines and metadata waiting for the next write (a step's commit, a heartbeat, the settle)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logs: list[dict] = []
        self.metadata: dict[str, Any] = {}

    def take(self) -> tuple[list[dict], dict]:
        with self.lock:
            logs, self.logs = self.logs, []
            metadata, self.metadata = self.metadata, {}
        return logs, metadata

    def put_back(self, logs: list[dict], metadata: dict) -> None:
        with self.lock:
            self.logs[:0] = logs
            self.metadata = {**metadata, **self.metadata}


@dataclass
class Written:
    cancel_requested: bool
    queue: str
    priority: int
    parent_id: UUID | None
    step_written: bool
    # The run's concurrency group (flow control); None for a task without a concurrency limit.
    concurrency_key: str | None = None


def _fenced_write(
    claim: Claim,
    buffer: _Buffer,
    *,
    run_set: str | None = None,
    params: dict | None = None,
    step: dict | None = None,
    cost: Decimal | None = None,
    saved: Decimal | None = None,
) -> Written | None:
    """The one statement behind every worker write: *only if we still hold the run's lease* (token +
    running), update the run as `run_set` says (or just lock it), and in the same statement flush buffered
    log lines and metadata and upsert `step`. None if the lease was lost (then nothing was written)."""
    logs, metadata = buffer.take()
    values: dict[str, Any] = {
        "run": str(claim.run_id),
        "token": claim.token,
        "lease": settings.DEX_LEASE_SECONDS,
        **(params or {}),
    }
    if metadata:
        run_set = (run_set or _LEASE_EXTEND) + ", metadata = metadata || %(metadata)s::jsonb"
        values["metadata"] = json.dumps(metadata, default=_json_default)
    if cost:  # an LLM step's spend lands on the run in the step's own statement
        run_set = (run_set or _LEASE_EXTEND) + ", cost_usd = cost_usd + %(cost)s"
        values["cost"] = cost
    if saved:
        run_set = (run_set or _LEASE_EXTEND) + ", saved_usd = saved_usd + %(saved)s"
        values["saved"] = saved
    owned = "id = %(run)s AND lease_token = %(token)s AND status = 'running'"
    columns = "id, cancel_requested_at, queue, priority, parent_id, concurrency_key_value"
    if run_set is None:
        # A step's commit only has to prove the lease (the heartbeat extends it): lock the run row against a
        # concurrent claim instead of updating it, which spares a new row version and its index entries.
        lease = f"SELECT {columns} FROM runs_run WHERE {owned} FOR NO KEY UPDATE"
    else:
        lease = f"UPDATE runs_run SET {run_set} WHERE {owned} RETURNING {columns}"
    sql = f"WITH lease AS ({lease})"
    if logs:
        sql += _LOGS_CTE
        values["logs"] = json.dumps(logs)
    if step is not None:
        sql += _STEP_CTE
        values.update(step)
    written = "(SELECT count(*) FROM step)" if step is not None else "0"
    sql += (
        f"\nSELECT cancel_requested_at IS NOT NULL, queue, priority, parent_id, {written}, concurrency_key_value"
        " FROM lease"
    )
    try:
        with connection.cursor() as cur:
            cur.execute(sql, values)
            row = cur.fetchone()
    except DatabaseError:
        buffer.put_back(logs, metadata)
        raise
    if row is None:
        return None
    result = Written(bool(row[0]), row[1], row[2], row[3], bool(row[4]), row[5])
    if step is not None and not result.step_written:
        # The step is already completed under this very token: only a reused token could do that.
        return None
    return result


# --- the run context ------------------------------------------------------------------------------------------

_current_scope: contextvars.ContextVar[tuple[RunContext, str] | None] = contextvars.ContextVar(
    "dex_scope", default=None
)


class _CaptureHandler(logging.Handler):
    """Puts log records emitted while a run's code runs onto that run (and its current step)."""

    def emit(self, record: logging.LogRecord) -> None:
        scope = _current_scope.get()
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


def _install_capture() -> None:
    global _capture_installed
    if not _capture_installed:
        logging.getLogger().addHandler(_capture_handler)
        _capture_installed = True


@dataclass
class _StepPlan:
    key: str
    seq: int
    kind: str
    attempt: int
    budget_used: int
    retry: Retry
    timeout: float | None
    started: datetime = field(default_factory=_now)
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
        self._buffer = _Buffer()
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
        from runs.ai.steps import AIContext

        self.ai = AIContext(self)

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
        json.dumps(value, default=_json_default)  # fail here, in the caller's code, if it can't be stored
        with self._buffer.lock:
            self._buffer.metadata[key] = value
        realtime.publish_now(realtime.RunEvent("metadata", self.run_id, {"key": key, "value": value}))

    def _add_log(self, step_key: str, level: str, message: str) -> None:
        # Redacted before it is stored or pushed: steps log requests, and requests carry keys.
        line = {
            "step_key": step_key,
            "ts": _now().isoformat(),
            "level": level,
            "message": redact(message[:20200])[:20000],
        }
        with self._buffer.lock:
            self._buffer.logs.append(line)
        realtime.publish_now(realtime.RunEvent("log", self.run_id, line))

    @contextmanager
    def _scope(self, step_key: str) -> Iterator[None]:
        token = _current_scope.set((self, step_key))
        try:
            yield
        finally:
            _current_scope.reset(token)

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
    def _step_begin(self, key: str, *, kind: str, retry: Retry | None, timeout: float | timedelta | None) -> _StepPlan:
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
            return _StepPlan(
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
        plan = _StepPlan(
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

    def _effective_timeout(self, plan: _StepPlan) -> tuple[float | None, bool]:
        """The step's time budget and whether it is the run's max_duration (not the step's timeout)."""
        remaining = self._remaining()
        if remaining is not None and (plan.timeout is None or remaining < plan.timeout):
            return max(remaining, 0.001), True
        return plan.timeout, False

    def _step_succeeded(self, plan: _StepPlan, value: Any, *, meta: dict | None = None) -> Any:
        try:
            text = encode_output(value, what=f"step {plan.key!r}")
            # A large output goes to the output storage now, before the row that references it commits.
            stored = offload.offload_text(text, run_id=self._claim.run_id)
        except (StepOutputError, offload.OutputStorageError) as exc:
            return self._step_failed(plan, exc)
        finished = _now()
        self._pending = (
            _step_row(plan, status=StepStatus.COMPLETED, output=stored, finished=finished, meta=meta),
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
        written = _fenced_write(self._claim, self._buffer, step=row, cost=self._pending_cost, saved=self._pending_saved)
        if written is None:
            self._lease_lost = True
            raise LeaseLost()
        self._pending = None
        self._pending_cost = None
        self._pending_saved = Decimal(0)
        self._cancel_requested = self._cancel_requested or written.cancel_requested
        realtime.publish_now(realtime.RunEvent("step", self.run_id, event))

    def _take_pending(self) -> dict[str, Any]:
        """The waiting step (and unwritten figures) as keyword arguments for `_settle`, which commits them
        with the run's end."""
        saved, self._pending_saved = self._pending_saved, Decimal(0)
        if self._pending is None:
            return {"saved": saved}
        row, event = self._pending
        cost, self._pending, self._pending_cost = self._pending_cost, None, None
        return {"step": row, "step_event": event, "cost": cost, "saved": saved}

    def _step_failed(self, plan: _StepPlan, exc: BaseException) -> Any:
        self._flush_pending()
        finished = _now()
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
                step=_step_row(
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
        failed = _step_row(plan, status=StepStatus.FAILED, error=error, history=history, finished=finished)
        if _fenced_write(self._claim, self._buffer, step=failed) is None:
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

    def _call_sync(self, plan: _StepPlan, fn: Callable, args: tuple, kwargs: dict) -> Any:
        budget, is_run_budget = self._effective_timeout(plan)
        self._step_attempt = plan.attempt
        started = time.monotonic()
        try:
            with self._scope(plan.key), _alarm(budget):
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
        return _child_output(outcome)

    def map(self, id: str, task: Task | str, payloads: list[dict]) -> list[Any]:
        """Fan out one child run per payload, park until all finish, fan in their outputs in order.
        Raises ChildRunFailed (naming the first failed child) if any failed."""
        return [_child_output(outcome) for outcome in self._children(id, StepKind.MAP, task, list(payloads))]

    def _children(self, id: str, kind: str, task: Task | str, payloads: list[dict]) -> list[dict]:
        from runs import services

        task_id = task if isinstance(task, str) else task.id
        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        plan = _StepPlan(key, rec.seq if rec else self._seq, kind, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            children = rec.meta.get("children", [])
            outcomes = _children_outcomes(children)
            if outcomes is not None:
                self._complete_wait(plan, output=outcomes)
                return outcomes
            # Not all children finished: park again (each child wakes the parent when it ends).
            self._park(
                step=_step_row(plan, status=StepStatus.WAITING, finished=None, meta={"children": children}),
                wake_at=None,
                event={"key": key, "status": "waiting", "kind": kind},
            )
        registry.get(task_id)  # an unknown task fails this run here, with a clear error

        def start_children() -> list[str]:
            ids = []
            for i, payload in enumerate(payloads):
                child, _ = services.run_trigger(
                    task_id=task_id,
                    payload=payload,
                    parent=Run(pk=self._claim.run_id),
                    idempotency_key=f"child:{self.run_id}:{key}:{i}",
                )
                ids.append(str(child.id))
            return ids

        if not payloads:
            self._complete_wait(plan, output=[])
            return []
        self._park(
            step=_step_row(plan, status=StepStatus.WAITING, finished=None),
            wake_at=None,
            event={"key": key, "status": "waiting", "kind": kind},
            children=start_children,
        )

    # -- durable timers ------------------------------------------------------------------------------
    def sleep(self, id: str, duration: timedelta | float) -> None:
        """Park the run for `duration` (a timedelta or seconds): no worker is held while it sleeps."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        self._sleep(id, lambda: _now() + timedelta(seconds=max(seconds, 0)))

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
        plan = _StepPlan(key, rec.seq if rec else self._seq, StepKind.SLEEP, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return
        if rec is not None:
            # Recorded as waiting and the run is executing again: only the timer wakes a sleeping run.
            self._complete_wait(plan, output=None)
            return
        when = wake_at()
        if when <= _now():
            self._complete_wait(plan, output=None)
            return
        self._park(
            step=_step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=when),
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
        from runs import waits

        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._flush_pending()
        self._check_boundary()
        plan = _StepPlan(key, rec.seq if rec else self._seq, kind, 1, 1, NO_RETRY_PLAN, None)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            outcome = waits.waitpoint_outcome(run_id=self._claim.run_id, step_key=key)
            if outcome.done:
                self._complete_wait(plan, output=outcome.result)
                return outcome.result
            # Woken while the wait is still open (a duplicate wake-up): park again on the same waitpoint.
            self._park(
                step=_step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=outcome.timeout_at),
                wake_at=outcome.timeout_at,
                event={"key": key, "status": "waiting", "kind": kind},
            )
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        timeout_at = _now() + timedelta(seconds=seconds) if seconds is not None else None
        self._park(
            step=_step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=timeout_at, meta=waitpoint),
            wake_at=timeout_at,
            event={"key": key, "status": "waiting", "kind": kind},
            waitpoint={"kind": kind, "step_key": key, "timeout_at": timeout_at, **waitpoint},
        )

    def _complete_wait(self, plan: _StepPlan, *, output: Any) -> None:
        finished = _now()
        text = offload.offload_text(encode_output(output, what=f"step {plan.key!r}"), run_id=self._claim.run_id)
        self._pending = (
            _step_row(plan, status=StepStatus.COMPLETED, output=text, finished=finished),
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


def encode_output_checked(value: Any, plan: _StepPlan) -> Any:
    """Raise StepOutputError now (inside the transaction, rolling it back) for an output Dex can't store."""
    encode_output(value, what=f"step {plan.key!r}")
    return value


NO_RETRY_PLAN = Retry(attempts=1)


def _step_row(
    plan: _StepPlan,
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


class AsyncRunContext:
    """The context of an `async def` task: the same contract, with awaitable steps."""

    def __init__(self, sync_ctx: RunContext):
        from runs.ai.steps import AsyncAIContext

        self._sync = sync_ctx
        self.log = sync_ctx.log
        self.ai = AsyncAIContext(sync_ctx.ai)

    run_id = property(lambda self: self._sync.run_id)
    task_id = property(lambda self: self._sync.task_id)
    attempt = property(lambda self: self._sync.attempt)
    cancelled = property(lambda self: self._sync.cancelled)

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
            with ctx._scope(plan.key):
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
                raise RunTimedOut() from None
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


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
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


# --- heartbeat ---------------------------------------------------------------------------------------------


class _Heartbeats:
    """One thread per worker process renews the lease of every run executing in it, every lease/3, on its
    own database connection; flushes their buffered logs and metadata; and notices cancel requests, lost
    leases and exhausted max_durations. Registering a run is a set insert: no thread per run."""

    def __init__(self) -> None:
        self._runs: set[RunContext] = set()
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, ctx: RunContext) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (or a forked pool child)
                self._runs = set()
                threading.Thread(target=self._loop, name="dex-heartbeat", daemon=True).start()
                self._pid = os.getpid()
            self._runs.add(ctx)

    def remove(self, ctx: RunContext) -> None:
        with self._lock:
            self._runs.discard(ctx)

    def _loop(self) -> None:
        while True:
            time.sleep(settings.DEX_LEASE_SECONDS / 3)
            with self._lock:
                runs = list(self._runs)
            for ctx in runs:
                self._beat(ctx)

    def _beat(self, ctx: RunContext) -> None:
        try:
            written = _fenced_write(ctx._claim, ctx._buffer, run_set=_LEASE_EXTEND)
        except DatabaseError:
            log.warning("heartbeat for run %s failed; retrying", ctx.run_id, exc_info=True)
            connection.close()
            return
        if written is None:
            ctx._lease_lost = True
            self.remove(ctx)
            return
        if written.cancel_requested:
            ctx._cancel_requested = True
        remaining = ctx._remaining()
        if remaining is not None and remaining <= 0:
            ctx._timed_out = True


_heartbeats = _Heartbeats()


# --- executing a run ----------------------------------------------------------------------------------------


def _load_steps(run_id: UUID) -> list[StepRecord]:
    from runs.models import Step

    rows = (
        Step.objects.filter(run_id=run_id)
        .order_by("seq")
        .values_list("seq", "key", "kind", "status", "attempts", "budget_used", "output", "meta", "error")
    )
    return [StepRecord(*row) for row in rows]


def run_execute(run_id: UUID | str, *, worker: str | None = None, heartbeat: bool = True) -> str | None:
    """Claim the run, execute it from the top with memoised steps, and settle it. Returns the status it
    left the run in (None when the run wasn't ours to execute). `heartbeat=False` is for in-process
    execution where no other worker competes (runs.testing), e.g. inside a test's transaction."""
    claim = run_claim(run_id, worker=worker or worker_name())
    if claim is None:
        return None
    if claim.cancel_requested:
        return _settle(claim, _Buffer(), RunStatus.CANCELED)
    try:
        task = registry.get(claim.task_id)
    except UnknownTask as exc:
        return _settle(
            claim,
            _Buffer(),
            RunStatus.FAILED,
            error={"type": "UnknownTask", "message": f"{exc}: is the worker's code up to date?"},
        )
    if task.max_duration is not None and claim.executed_seconds >= task.max_duration:
        return _settle(claim, _Buffer(), RunStatus.TIMED_OUT, error=_timed_out_error(task))

    # A run's first execution has no steps yet (unless it is a fork, which starts with copied ones).
    try:
        steps = _load_steps(claim.run_id) if claim.may_have_steps else []
    except offload.OutputStorageError as exc:
        # A recorded output can't be read back (storage down, blob deleted): replaying without it would be
        # wrong. Fail the run saying why; a retry resumes from the same step once the storage is back.
        return _settle(claim, _Buffer(), RunStatus.FAILED, error=error_info(exc))
    ctx = RunContext(claim=claim, task=task, steps=steps)
    realtime.publish_now(realtime.run_changed(claim.run_id, RunStatus.RUNNING), to_runs_list=True)
    _install_capture()
    if heartbeat:
        _heartbeats.add(ctx)
    try:
        try:
            kwargs = task.call_arguments(claim.payload)
            with ctx._scope(""):
                if task.is_async:
                    # async_to_sync (not asyncio.run) so the engine's sync_to_async calls run back on this
                    # thread, on this thread's database connection.
                    value = async_to_sync(task.fn)(AsyncRunContext(ctx), **kwargs)
                else:
                    value = task.fn(ctx, **kwargs)
            output = offload.offload_text(encode_output(value, what=f"task {task.id!r}"), run_id=claim.run_id)
        finally:
            _heartbeats.remove(ctx)
    except Parked:
        return RunStatus.WAITING
    except LeaseLost:
        log.info("run %s: lease lost; leaving it to its new owner", claim.run_id)
        return None
    except StepFailedForGood as exc:
        return _fail_compensated(ctx, exc.error)
    except DatabaseError:
        # Postgres is unreachable or failed under us: nothing can be recorded now. The lease expires and
        # the scheduler re-queues the run, which resumes after its last committed step.
        log.exception("run %s: database error; the run will be recovered after its lease expires", run_id)
        return None
    except Cancelled:
        return _settle(claim, ctx._buffer, RunStatus.CANCELED, **ctx._take_pending())
    except RunTimedOut:
        return _settle(claim, ctx._buffer, RunStatus.TIMED_OUT, error=_timed_out_error(task), **ctx._take_pending())
    except Exception as exc:
        return _settle(claim, ctx._buffer, RunStatus.FAILED, error=error_info(exc), **ctx._take_pending())
    # The last step (if it is still waiting for a boundary) commits with the run's end: one statement.
    return _settle(claim, ctx._buffer, RunStatus.COMPLETED, output=output, **ctx._take_pending())


def _fail_compensated(ctx: RunContext, error: dict) -> str | None:
    """A step failed for good: run the compensations registered so far (newest first, each a durable step,
    resumable after a crash), then fail the run with what was undone recorded on its error."""
    claim = ctx._claim
    if ctx._compensations:
        _heartbeats.add(ctx)
        try:
            error = {**error, "compensated": ctx._compensate()}
        except Parked:
            return RunStatus.WAITING  # a compensation's retry back-off; resumes here after it
        except LeaseLost:
            return None
        except StepFailedForGood as failed:
            error = {**error, "compensation_failed": failed.error}
        except (Cancelled, RunTimedOut):
            error = {**error, "compensation_interrupted": True}
        finally:
            _heartbeats.remove(ctx)
    return _settle(claim, ctx._buffer, RunStatus.FAILED, error=error, **ctx._take_pending())


def _timed_out_error(task: Task) -> dict:
    return {"type": "RunTimedOut", "message": f"the run used up its max_duration of {task.max_duration:g}s"}


_SETTLE_SET = """status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
       finished_at = now(), lease_owner = '', lease_expires_at = NULL, wake_at = NULL,
       executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""


def _settle(
    claim: Claim,
    buffer: _Buffer,
    status: str,
    *,
    output: str | None = None,
    error: dict | None = None,
    step: dict | None = None,
    step_event: dict | None = None,
    cost: Decimal | None = None,
    saved: Decimal | None = None,
) -> str | None:
    """End the run (fenced by the lease token) in one statement with the last buffered lines and `step`."""
    written = _fenced_write(
        claim,
        buffer,
        run_set=_SETTLE_SET,
        params={"status": status, "output": output, "error": json.dumps(error) if error else None},
        step=step,
        cost=cost,
        saved=saved,
    )
    if written is None:
        return None
    if step_event is not None:
        realtime.publish_now(realtime.RunEvent("step", str(claim.run_id), step_event))
    realtime.publish_now(realtime.run_changed(claim.run_id, status), to_runs_list=True)
    alerts.alerts_run_settled(claim.run_id, status)  # after the settle committed; never raises
    if written.concurrency_key is not None:
        _release_slot(claim, written.concurrency_key)
    if written.parent_id is not None:
        runs_wake([written.parent_id])  # the parent waits on this child (invoke / map)
    return status


_PARK_SET = """status = %(status)s, wake_at = %(wake_at)s, lease_owner = '', lease_expires_at = NULL,
       enqueued_at = CASE WHEN %(status)s = 'queued' THEN now() END,
       executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""


def run_park(
    claim: Claim,
    buffer: _Buffer,
    *,
    step: dict,
    wake_at: datetime | None,
    waitpoint: dict | None = None,
    children: Callable[[], list[str]] | None = None,
    saved: Decimal | None = None,
) -> bool:
    """Record the parking step and set the run waiting until `wake_at` (straight back to queued when it is
    already due), releasing the lease: one statement, plus in the same transaction what the run waits on —
    its waitpoint, or its child runs (created here, so none can finish before the parent is parked on it).
    False if the lease was lost."""
    due = wake_at is not None and wake_at <= _now()
    status = RunStatus.QUEUED if due else RunStatus.WAITING
    with transaction.atomic():
        written = _fenced_write(
            claim,
            buffer,
            run_set=_PARK_SET,
            params={"status": status, "wake_at": None if due else wake_at},
            step=step,
            saved=saved,
        )
        if written is None:
            return False
        if waitpoint is not None:
            from runs import waits

            waits.waitpoint_create(run_id=claim.run_id, **waitpoint)
        if children is not None:
            ids = children()
            from runs.models import Step

            Step.objects.filter(run_id=claim.run_id, key=step["s_key"]).update(meta={"children": ids})
    if due:
        _enqueue(claim.run_id, queue=written.queue, priority=written.priority)
    if written.concurrency_key is not None:
        _release_slot(claim, written.concurrency_key)
    realtime.publish_now(realtime.run_changed(claim.run_id, status), to_runs_list=True)
    return True


def _release_slot(claim: Claim, concurrency_key: str) -> None:
    """The run left `running` (settled or parked): hand its concurrency slot to the group's best queued run.
    A failure here only delays them: the scheduler re-sends queued runs nobody claimed."""
    from runs.engine import flow

    task = registry.get(claim.task_id) if claim.task_id in registry else None
    try:
        flow.release_slots(task_id=claim.task_id, ckey=concurrency_key, task=task)
    except DatabaseError:
        log.warning("run %s: could not hand on its concurrency slot", claim.run_id, exc_info=True)


def _children_outcomes(children: list[str]) -> list[dict] | None:
    """Each child's {run, status, output, error} in order, or None while any is still unfinished."""
    rows = {str(r["id"]): r for r in Run.objects.filter(pk__in=children).values("id", "status", "output", "error")}
    if len(rows) < len(children) or any(r["status"] not in TERMINAL for r in rows.values()):
        return None
    return [
        {"run": child, "status": rows[child]["status"], "output": rows[child]["output"], "error": rows[child]["error"]}
        for child in children
    ]


def _child_output(outcome: dict) -> Any:
    if outcome["status"] == RunStatus.COMPLETED:
        return outcome["output"]
    error = outcome.get("error") or {}
    message = error.get("message") or outcome["status"]
    raise ChildRunFailed(
        f"child run {outcome['run']} ended {outcome['status']}: {message}", run_id=outcome["run"], error=error
    )


TERMINAL = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.TIMED_OUT}


def runs_wake(run_ids: list[Any]) -> int:
    """Re-queue waiting runs whose wait was completed (an event, an approval); enqueue on commit."""
    if not run_ids:
        return 0
    with connection.cursor() as cur:
        cur.execute(
            """UPDATE runs_run SET status = 'queued', wake_at = NULL, enqueued_at = now()
                WHERE id = ANY(%s::uuid[]) AND status = 'waiting' RETURNING id, queue, priority""",
            [[str(r) for r in run_ids]],
        )
        rows = cur.fetchall()
    for run_id, queue, priority in rows:
        enqueue_on_commit(run_id, queue=queue, priority=priority)
        realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    return len(rows)


# --- operator transitions (cancel, retry) -------------------------------------------------------------------


def run_request_cancel(run_id: UUID | str) -> str | None:
    """Cancel a run: at once if queued/delayed/waiting, at the next step boundary or heartbeat if running.
    Returns the run's status after the request, or None if it had already finished."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            """UPDATE runs_run SET status = 'canceled', finished_at = now(), wake_at = NULL,
                          cancel_requested_at = now()
                    WHERE id = %s AND status IN ('queued', 'delayed', 'waiting') RETURNING id, parent_id""",
            [str(run_id)],
        )
        if cur.fetchone():
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.CANCELED), to_runs_list=True)
            return RunStatus.CANCELED
        cur.execute(
            """UPDATE runs_run SET cancel_requested_at = coalesce(cancel_requested_at, now())
                    WHERE id = %s AND status = 'running' RETURNING id""",
            [str(run_id)],
        )
        if cur.fetchone():
            realtime.publish_on_commit(
                realtime.run_changed(run_id, RunStatus.RUNNING, cancel_requested=True), to_runs_list=True
            )
            return RunStatus.RUNNING
    return None


def run_retry_from_failed_step(run_id: UUID | str) -> bool:
    """Re-queue a failed / timed-out / canceled run; it resumes at the step that failed, whose attempts
    budget starts afresh. Completed steps are never run again. False if the run isn't in such a state."""
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(
                """UPDATE runs_run
                      SET status = 'queued', error = NULL, output = NULL, finished_at = NULL,
                          cancel_requested_at = NULL, executed_seconds = 0, recoveries = 0,
                          enqueued_at = now(), wake_at = NULL
                    WHERE id = %s AND status IN ('failed', 'timed_out', 'canceled')
                RETURNING queue, priority""",
                [str(run_id)],
            )
            row = cur.fetchone()
            if row is None:
                return False
            cur.execute(
                """UPDATE runs_step SET status = 'retrying', budget_used = 0, wake_at = NULL
                    WHERE run_id = %s AND status IN ('failed', 'retrying')""",
                [str(run_id)],
            )
        enqueue_on_commit(run_id, queue=row[0], priority=row[1])
        realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    return True


def run_wake_now(run_id: UUID | str) -> bool:
    """Wake a waiting/delayed run at once, as if its timer had fired (time travel in runs.testing)."""
    with transaction.atomic():
        updated = Run.objects.filter(pk=run_id, status__in=[RunStatus.WAITING, RunStatus.DELAYED]).update(
            status=RunStatus.QUEUED, wake_at=None, enqueued_at=_now()
        )
        if updated:
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    return bool(updated)


# --- the scheduler's tick ------------------------------------------------------------------------------------

_TICK_SQL = """
WITH due AS (
  SELECT id FROM runs_run
   WHERE status IN ('waiting', 'delayed') AND wake_at <= now()
   ORDER BY wake_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
woken AS (
  UPDATE runs_run r SET status = 'queued', wake_at = NULL, enqueued_at = now()
    FROM due WHERE r.id = due.id
  RETURNING r.id, r.queue, r.priority),
expired AS (
  SELECT id FROM runs_run
   WHERE status = 'running' AND lease_expires_at < now()
   ORDER BY lease_expires_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
recovered AS (
  UPDATE runs_run r
     SET status = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN 'failed' ELSE 'queued' END,
         error = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN jsonb_build_object(
                   'type', 'WorkerLost',
                   'message', format('the worker executing this run died %%s times; dead-lettered',
                                     r.recoveries + 1)) END,
         finished_at = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN now() END,
         recoveries = r.recoveries + 1, lease_owner = '', lease_expires_at = NULL, enqueued_at = now(),
         executed_seconds = r.executed_seconds
                            + greatest(0, extract(epoch FROM r.lease_expires_at - r.claimed_at))
    FROM expired WHERE r.id = expired.id
  RETURNING r.id, r.queue, r.priority, r.status),
stale AS (
  SELECT id FROM runs_run
   WHERE status = 'queued' AND enqueued_at < now() - make_interval(secs => %(stale)s)
     AND (wake_at IS NULL OR wake_at <= now())  -- a rate-limited run is re-sent when its window opens
   ORDER BY enqueued_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
throttled AS (
  -- Rate-limited queued runs (flow.claim_next set wake_at) whose window opened.
  SELECT id FROM runs_run
   WHERE status = 'queued' AND wake_at <= now()
   ORDER BY wake_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
resent AS (
  UPDATE runs_run r SET enqueued_at = now(), wake_at = NULL
    FROM (SELECT id FROM stale UNION SELECT id FROM throttled) AS due_again WHERE r.id = due_again.id
  RETURNING r.id, r.queue, r.priority)
SELECT 'woken', id, queue, priority FROM woken
UNION ALL SELECT CASE WHEN status = 'failed' THEN 'dead' ELSE 'recovered' END, id, queue, priority
            FROM recovered
UNION ALL SELECT 'resent', id, queue, priority FROM resent
-- Whether a cron schedule is due (the scheduler then fires it): folded in to keep an idle tick one query.
UNION ALL SELECT 'schedules', NULL, NULL, NULL
           WHERE EXISTS (SELECT 1 FROM runs_schedule WHERE enabled AND next_run_at <= now())
"""


@dataclass
class TickResult:
    woken: int = 0
    recovered: int = 0
    dead: int = 0
    resent: int = 0
    schedules_due: bool = False

    @property
    def total(self) -> int:
        return self.woken + self.recovered + self.dead + self.resent


def scheduler_tick(*, batch: int = 500) -> TickResult:
    """One scan, one statement: wake due runs, re-queue runs whose worker died (dead-letter past
    DEX_MAX_RECOVERIES), re-send wake-ups nobody claimed. Several schedulers may tick at once: SKIP LOCKED
    gives each row to one of them. Enqueues after commit."""
    result = TickResult()
    # One statement is its own transaction (autocommit): the enqueues below run once it has committed.
    with connection.cursor() as cur:
        cur.execute(
            _TICK_SQL,
            {
                "batch": batch,
                "max_recoveries": settings.DEX_MAX_RECOVERIES,
                "stale": settings.DEX_REQUEUE_STALE_SECONDS,
            },
        )
        rows = cur.fetchall()
    for kind, run_id, queue, priority in rows:
        if kind == "schedules":
            result.schedules_due = True
            continue
        setattr(result, kind, getattr(result, kind) + 1)
        if kind == "dead":
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.FAILED), to_runs_list=True)
            continue
        enqueue_on_commit(run_id, queue=queue, priority=priority)
        if kind != "resent":
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    if result.dead:
        _release_dead_letter_slots([run_id for kind, run_id, _q, _p in rows if kind == "dead"])
    return result


def _release_dead_letter_slots(run_ids: list[Any]) -> None:
    """A dead-lettered run left `running` without settling: hand its concurrency slot on (flow control)."""
    from runs.engine import flow

    groups = set(
        Run.objects.filter(pk__in=run_ids, concurrency_key_value__isnull=False).values_list(
            "task_id", "concurrency_key_value"
        )
    )
    for task_id, ckey in groups:
        task = registry.get(task_id) if task_id in registry else None
        flow.release_slots(task_id=task_id, ckey=ckey, task=task)
