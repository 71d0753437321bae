"""Ending or parking a run: one fenced statement that releases the lease."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from django.db import DatabaseError, transaction

from runs import realtime
from runs.engine.codec import now
from runs.engine.dispatch import enqueue
from runs.engine.flow import release_slots
from runs.engine.hooks import run_settled
from runs.engine.lease import Buffer, Claim, fenced_write
from runs.engine.transitions import runs_wake
from runs.engine.waits import waitpoint_create
from runs.models import RunStatus, Step
from runs.sdk.registry import registry

log = logging.getLogger(__name__)

_SETTLE_SET = """status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
       finished_at = now(), lease_owner = '', lease_expires_at = NULL, wake_at = NULL,
       executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""


def run_settle(
    claim: Claim,
    buffer: Buffer,
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
    written = fenced_write(
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
    run_settled(claim.run_id, status)  # after the settle committed (alerts listen); never raises
    if written.concurrency_key is not None:
        release_slot(claim, written.concurrency_key)
    if written.parent_id is not None:
        runs_wake([written.parent_id])  # the parent waits on this child (invoke / map)
    return status


_PARK_SET = """status = %(status)s, wake_at = %(wake_at)s, lease_owner = '', lease_expires_at = NULL,
       enqueued_at = CASE WHEN %(status)s = 'queued' THEN now() END,
       executed_seconds = executed_seconds + extract(epoch FROM now() - claimed_at)"""


def run_park(
    claim: Claim,
    buffer: Buffer,
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
    due = wake_at is not None and wake_at <= now()
    status = RunStatus.QUEUED if due else RunStatus.WAITING
    with transaction.atomic():
        written = fenced_write(
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
            waitpoint_create(run_id=claim.run_id, **waitpoint)
        if children is not None:
            ids = children()
            Step.objects.filter(run_id=claim.run_id, key=step["s_key"]).update(meta={"children": ids})
    if due:
        enqueue(claim.run_id, queue=written.queue, priority=written.priority)
    if written.concurrency_key is not None:
        release_slot(claim, written.concurrency_key)
    realtime.publish_now(realtime.run_changed(claim.run_id, status), to_runs_list=True)
    return True


def release_slot(claim: Claim, concurrency_key: str) -> None:
    """The run left `running` (settled or parked): hand its concurrency slot to the group's best queued run.
    A failure here only delays them: the scheduler re-sends queued runs nobody claimed."""

    task = registry.get(claim.task_id) if claim.task_id in registry else None
    try:
        release_slots(task_id=claim.task_id, ckey=concurrency_key, task=task)
    except DatabaseError:
        log.warning("run %s: could not hand on its concurrency slot", claim.run_id, exc_info=True)
