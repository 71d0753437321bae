"""Executing a run: claim, replay from the top with memoised steps, settle."""

from __future__ import annotations

import logging
from uuid import UUID

from asgiref.sync import async_to_sync
from django.db import DatabaseError

from runs import offload, realtime
from runs.engine.codec import encode_output
from runs.engine.context import RunContext, install_log_capture
from runs.engine.context_async import AsyncRunContext
from runs.engine.errors import LeaseLost, Parked, RunTimedOut, StepFailedForGood, error_info
from runs.engine.heartbeat import heartbeats
from runs.engine.hooks import trace_execution_ended, trace_execution_started
from runs.engine.lease import Buffer, StepRecord, run_claim, worker_name
from runs.engine.settle import run_settle
from runs.models import RunStatus, Step
from runs.sdk import Cancelled, Task
from runs.sdk.registry import UnknownTask, registry

log = logging.getLogger(__name__)

# --- executing a run ----------------------------------------------------------------------------------------


def load_steps(run_id: UUID) -> list[StepRecord]:
    rows = (
        Step.objects.filter(run_id=run_id)
        .order_by("seq")
        .values_list("seq", "key", "kind", "status", "attempts", "budget_used", "output", "meta", "error", "wake_at")
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
        return run_settle(claim, Buffer(), RunStatus.CANCELED)
    try:
        task = registry.get(claim.task_id)
    except UnknownTask as exc:
        return run_settle(
            claim,
            Buffer(),
            RunStatus.FAILED,
            error={"type": "UnknownTask", "message": f"{exc}: is the worker's code up to date?"},
        )
    deadline = task.deadline_seconds
    if deadline is not None and claim.executed_seconds >= deadline:
        return run_settle(claim, Buffer(), RunStatus.TIMED_OUT, error=timed_out_error(task))

    # A run's first execution has no steps yet (unless it is a fork, which starts with copied ones).
    try:
        steps = load_steps(claim.run_id) if claim.may_have_steps else []
    except offload.OutputStorageError as exc:
        # A recorded output can't be read back (storage down, blob deleted): replaying without it would be
        # wrong. Fail the run saying why; a retry resumes from the same step once the storage is back.
        return run_settle(claim, Buffer(), RunStatus.FAILED, error=error_info(exc))
    ctx = RunContext(claim=claim, task=task, steps=steps)
    trace_execution_started(ctx)
    status = None
    try:
        status = _execute_claimed(ctx, task, heartbeat=heartbeat)
        return status
    finally:
        trace_execution_ended(ctx, status)


def _execute_claimed(ctx: RunContext, task: Task, *, heartbeat: bool) -> str | None:
    """Run the task's code from the top against the recorded steps, then settle (or park) the run."""
    claim = ctx._claim
    realtime.publish_now(
        realtime.run_changed(
            claim.run_id,
            RunStatus.RUNNING,
            started_at=claim.started_at.isoformat() if claim.started_at else None,
            code_version=claim.code_version,
            cost_usd=format(claim.cost_usd, "f"),
            steps_completed=ctx._completed,
        ),
        to_runs_list=True,
    )
    install_log_capture()
    if heartbeat:
        heartbeats.add(ctx)
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
            if ctx._stop is not None:
                raise ctx._stop  # the agent's code caught the signal that stopped it (`except BaseException`)
            output = offload.offload_text(encode_output(value, what=f"task {task.id!r}"), run_id=claim.run_id)
        finally:
            heartbeats.remove(ctx)
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
        log.exception("run %s: database error; the run will be recovered after its lease expires", claim.run_id)
        return None
    except Cancelled:
        return _settle(ctx, RunStatus.CANCELED)
    except RunTimedOut:
        return _settle(ctx, RunStatus.TIMED_OUT, error=timed_out_error(task))
    except Exception as exc:
        return _settle(ctx, RunStatus.FAILED, error=error_info(exc))
    return _settle(ctx, RunStatus.COMPLETED, output=output)


def _settle(ctx: RunContext, status: str, **fields: object) -> str | None:
    return run_settle(
        ctx._claim,
        ctx._buffer,
        status,
        saved=ctx._unwritten_saved,
        steps_completed=ctx._completed,
        **fields,  # type: ignore[arg-type]
    )


def _fail_compensated(ctx: RunContext, error: dict) -> str | None:
    """A step failed for good: run the compensations registered so far (newest first, each a durable step,
    resumable after a crash), then fail the run with what was undone recorded on its error."""
    if ctx._compensations:
        heartbeats.add(ctx)
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
            heartbeats.remove(ctx)
    return _settle(ctx, RunStatus.FAILED, error=error)


def timed_out_error(task: Task) -> dict:
    deadline = task.deadline_seconds or 0
    if task.max_duration is None:
        message = f"the run used up DEX_DEFAULT_MAX_DURATION ({deadline:g}s; the task sets no max_duration)"
    else:
        message = f"the run used up its max_duration of {deadline:g}s"
    return {"type": "RunTimedOut", "message": message}
