"""Ending or parking a run: one fenced statement that releases the lease."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from django.db import DatabaseError, connection, transaction

from runs import realtime
from runs.engine.dispatch import enqueue
from runs.engine.flow import release_slots
from runs.engine.hooks import run_settled
from runs.engine.lease import Buffer, Claim, Written, fenced_write
from runs.engine.transitions import runs_wake
from runs.engine.waits import waitpoint_create
from runs.models import TERMINAL_STATUSES, RunStatus, Step
from runs.sdk.registry import registry

log = logging.getLogger(__name__)

_SETTLE_SET = """status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
       finished_at = now(), lease_owner = '', lease_expires_at = NULL, wake_at = NULL, lease_backend_pid = NULL,
       inflight = NULL, executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""

# The scheduler sleeps until the next due time; a run parking with a nearer one says so (scheduler.py).
SCHEDULER_CHANNEL = "dex_scheduler"


def run_settle(
    claim: Claim,
    buffer: Buffer,
    status: str,
    *,
    output: str | None = None,
    error: dict | None = None,
    saved: Decimal | None = None,
    steps_completed: int | None = None,
) -> str | None:
    """End the run (fenced by the lease token) in one statement with the last buffered lines."""
    written = fenced_write(
        claim,
        buffer,
        run_set=_SETTLE_SET,
        params={"status": status, "output": output, "error": json.dumps(error) if error else None},
        saved=saved,
    )
    if written is None:
        return None
    realtime.publish_now(
        run_event(claim, written, status, steps_completed=steps_completed, error=error), to_runs_list=True
    )
    run_settled(claim.run_id, status)  # after the settle committed (alerts listen); never raises
    if written.concurrency_key is not None:
        release_slot(claim, written.concurrency_key)
    if written.parent_id is not None:
        runs_wake([written.parent_id])  # the parent waits on this child (invoke / map)
    return status


def run_event(claim: Claim, written: Written, status: str, **extra: object) -> realtime.RunEvent:
    """A run's status change with what the live header shows (runs.realtime's event contract)."""
    return realtime.run_changed(
        claim.run_id,
        status,
        started_at=written.started_at.isoformat() if written.started_at else None,
        finished_at=written.finished_at.isoformat() if written.finished_at else None,
        cost_usd=format(written.cost_usd, "f"),
        code_version=written.code_version,
        **{k: v for k, v in extra.items() if v is not None},
    )


_PARK_SET = """status = %(status)s, wake_at = %(wake_at)s, lease_owner = '', lease_expires_at = NULL,
       lease_backend_pid = NULL, inflight = NULL, enqueued_at = CASE WHEN %(requeued)s THEN now() END,
       executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""


def run_park(
    claim: Claim,
    buffer: Buffer,
    *,
    step: dict,
    wake_at: datetime | None,
    event: dict,
    waitpoint: dict | None = None,
    children: Callable[[], list[str]] | None = None,
    awaiting: list[str] | None = None,
    saved: Decimal | None = None,
) -> bool:
    """Record the parking step and set the run waiting until `wake_at` (straight back to queued when it is
    already due), releasing the lease: one statement, plus in the same transaction what the run waits on —
    its waitpoint, or its child runs (created here, so none can finish before the parent is parked on it).
    `awaiting`: the children a parent parks on again; if the last of them ended after the parent read them,
    its wake-up found the parent still running, so the park wakes the parent itself.
    Publishes the step's `event` and the run's change. False if the lease was lost."""
    due = wake_at is not None and wake_at <= claim.now()
    status = RunStatus.QUEUED if due else RunStatus.WAITING
    with transaction.atomic():
        written = fenced_write(
            claim,
            buffer,
            run_set=_PARK_SET,
            params={"status": status, "wake_at": None if due else wake_at, "requeued": due},
            step=step,
            saved=saved,
        )
        if written is None:
            return False
        if waitpoint is not None:
            waitpoint_create(run_id=claim.run_id, **waitpoint)
        if children is not None:
            event["children"] = ids = children()
            Step.objects.filter(run_id=claim.run_id, key=step["s_key"]).update(meta={"children": ids})
        # The parent's row is locked until this commits: a child ending from here on wakes it after the commit
        # (its UPDATE waits for the lock and then sees `waiting`); one that ended before is seen here.
        if awaiting and _all_ended(awaiting) and runs_wake([claim.run_id]):
            status = RunStatus.QUEUED  # what the live header shows last
        if wake_at is not None and not due:
            with connection.cursor() as cur:
                cur.execute("SELECT pg_notify(%s, '')", [SCHEDULER_CHANNEL])
    if due:
        enqueue(claim.run_id, queue=written.queue, priority=written.priority)
    if written.concurrency_key is not None:
        release_slot(claim, written.concurrency_key)
    event["id"] = written.step_id
    realtime.publish_now(realtime.RunEvent("step", str(claim.run_id), event))
    realtime.publish_now(
        run_event(claim, written, status, wake_at=wake_at.isoformat() if wake_at else None), to_runs_list=True
    )
    return True


def _all_ended(run_ids: list[str]) -> bool:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM runs_run WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
            [run_ids, [status.value for status in TERMINAL_STATUSES]],
        )
        return cur.fetchone()[0] == len(set(run_ids))


def release_slot(claim: Claim, concurrency_key: str) -> None:
    """The run left `running` (settled or parked): hand its concurrency slot to the group's best queued run.
    A failure here only delays them: the scheduler re-sends queued runs nobody claimed."""

    task = registry.get(claim.task_id) if claim.task_id in registry else None
    try:
        release_slots(task_id=claim.task_id, ckey=concurrency_key, task=task)
    except DatabaseError:
        log.warning("run %s: could not hand on its concurrency slot", claim.run_id, exc_info=True)
