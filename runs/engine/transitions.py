"""Run state changes made from outside a run's execution: wake, cancel, retry."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from django.db import connection, transaction

from runs import realtime
from runs.engine.codec import now
from runs.engine.dispatch import enqueue_on_commit
from runs.models import TERMINAL_STATUSES, Run, RunStatus

log = logging.getLogger(__name__)


def runs_wake(run_ids: list[Any]) -> list[Any]:
    """Re-queue waiting runs whose wait was completed (an event, an approval); enqueue on commit. Returns the
    runs it woke (a run that is not waiting — canceled meanwhile, say — is left alone)."""
    if not run_ids:
        return []
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
    return [row[0] for row in rows]


# --- operator transitions (cancel, retry) -------------------------------------------------------------------


def run_request_cancel(run_id: UUID | str) -> str | None:
    """Cancel a run: at once if queued/delayed/waiting, at the next step boundary or heartbeat if running.
    Returns the run's status after the request, or None if it had already finished."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            """UPDATE runs_run SET status = 'canceled', finished_at = now(), wake_at = NULL,
                          cancel_requested_at = now()
                    WHERE id = %s AND status IN ('queued', 'delayed', 'waiting') RETURNING finished_at""",
            [str(run_id)],
        )
        canceled = cur.fetchone()
        if canceled:
            event = realtime.run_changed(
                run_id, RunStatus.CANCELED, finished_at=canceled[0].isoformat(), wake_at=None, cancel_requested=True
            )
            realtime.publish_on_commit(event, to_runs_list=True)
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


def run_cancel_tree(run_id: UUID | str) -> str | None:
    """Cancel a run and every unfinished run below it (children, their children...). Returns the run's status
    after the request (canceled, or running until its next step boundary), or None if it had already finished."""
    status = run_request_cancel(run_id)
    if status is None:
        return None
    parents = [run_id]
    while parents:
        children = list(
            Run.objects.filter(parent_id__in=parents).exclude(status__in=TERMINAL_STATUSES).values_list("id", flat=True)
        )
        for child_id in children:
            run_request_cancel(child_id)
        parents = children
    return status


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
        # What the retry cleared, so a live page shows it without reading the run back.
        event = realtime.run_changed(run_id, RunStatus.QUEUED, error=None, output=None, finished_at=None, wake_at=None)
        realtime.publish_on_commit(event, to_runs_list=True)
    return True


def run_wake_now(run_id: UUID | str) -> bool:
    """Wake a waiting/delayed run at once, as if its timer had fired (time travel in runs.testing): the
    recorded deadlines it waits for (a sleep's wake-up, a wait's timeout) move to now."""
    with transaction.atomic():
        updated = Run.objects.filter(pk=run_id, status__in=[RunStatus.WAITING, RunStatus.DELAYED]).update(
            status=RunStatus.QUEUED, wake_at=None, enqueued_at=now()
        )
        if updated:
            with connection.cursor() as cur:
                cur.execute(
                    """UPDATE runs_step SET wake_at = now()
                        WHERE run_id = %s AND status IN ('waiting', 'retrying') AND wake_at > now()""",
                    [str(run_id)],
                )
                cur.execute(
                    """UPDATE runs_waitpoint SET timeout_at = now()
                        WHERE run_id = %s AND completed_at IS NULL AND timeout_at > now()""",
                    [str(run_id)],
                )
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    return bool(updated)
