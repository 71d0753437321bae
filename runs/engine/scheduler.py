"""The scheduler's tick: one statement that wakes, recovers and re-sends, and says when to look again."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings

from runs import realtime
from runs.engine.dispatch import enqueue_on_commit
from runs.engine.flow import release_slots
from runs.engine.sql import hot_cursor
from runs.models import Run, RunStatus
from runs.sdk.registry import registry

log = logging.getLogger(__name__)

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
alive AS (SELECT pid FROM pg_stat_activity),
expired AS (
  -- A worker died: its lease expired, or (sooner) the Postgres session of its process is gone.
  SELECT id FROM runs_run
   WHERE status = 'running'
     AND (lease_expires_at < now()
          OR (lease_backend_pid IS NOT NULL AND lease_backend_pid NOT IN (SELECT pid FROM alive)))
   ORDER BY lease_expires_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
recovered AS (
  UPDATE runs_run r
     SET status = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN 'failed' ELSE 'queued' END,
         error = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN jsonb_build_object(
                   'type', 'WorkerLost',
                   'message', format('the worker executing this run died %%s times; dead-lettered',
                                     r.recoveries + 1)) END,
         finished_at = CASE WHEN r.recoveries + 1 >= %(max_recoveries)s THEN now() END,
         recoveries = r.recoveries + 1, lease_owner = '', lease_expires_at = NULL, lease_backend_pid = NULL,
         enqueued_at = now(),
         executed_seconds = r.executed_seconds
                            + greatest(0, extract(epoch FROM least(now(), r.lease_expires_at) - r.claimed_at))
    FROM expired WHERE r.id = expired.id
  RETURNING r.id, r.queue, r.priority, r.status),
stale AS (
  -- Unclaimed longer than the backstop allows, doubling with each re-send (a long queue is not a lost message).
  SELECT id FROM runs_run
   WHERE status = 'queued' AND enqueued_at < now() - make_interval(secs => %(stale)s)
     AND enqueued_at < now() - make_interval(secs => %(stale)s * power(2, least(resends, 10)))
     AND (wake_at IS NULL OR wake_at <= now())  -- a rate-limited run is re-sent when its window opens
   ORDER BY enqueued_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
throttled AS (
  -- Rate-limited queued runs (flow.claim_next set wake_at) whose window opened.
  SELECT id FROM runs_run
   WHERE status = 'queued' AND wake_at <= now()
   ORDER BY wake_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED),
resent AS (
  UPDATE runs_run r SET enqueued_at = now(), wake_at = NULL,
                        resends = r.resends + CASE WHEN r.id IN (SELECT id FROM stale) THEN 1 ELSE 0 END
    FROM (SELECT id FROM stale UNION SELECT id FROM throttled) AS due_again WHERE r.id = due_again.id
  RETURNING r.id, r.queue, r.priority)
SELECT 'woken', id, queue, priority, NULL::timestamptz FROM woken
UNION ALL SELECT CASE WHEN status = 'failed' THEN 'dead' ELSE 'recovered' END, id, queue, priority, NULL
            FROM recovered
UNION ALL SELECT 'resent', id, queue, priority, NULL FROM resent
-- Whether a cron schedule is due (the scheduler then fires it): folded in to keep an idle tick one query.
UNION ALL SELECT 'schedules', NULL, NULL, NULL, NULL
           WHERE EXISTS (SELECT 1 FROM runs_schedule WHERE enabled AND next_run_at <= now())
-- When something is next due, so an idle scheduler sleeps until then (each an index probe).
UNION ALL SELECT 'next', NULL, NULL, NULL, least(
  (SELECT min(wake_at) FROM runs_run WHERE status IN ('waiting', 'delayed')),
  (SELECT min(lease_expires_at) FROM runs_run WHERE status = 'running'),
  (SELECT min(enqueued_at) FROM runs_run WHERE status = 'queued') + make_interval(secs => %(stale)s),
  (SELECT min(wake_at) FROM runs_run WHERE status = 'queued'),
  (SELECT min(next_run_at) FROM runs_schedule WHERE enabled))
"""

# A run whose worker died goes ahead of new work: its wake-up is sent at the broker's top priority.
RECOVERY_PRIORITY = 9


@dataclass
class TickResult:
    woken: int = 0
    recovered: int = 0
    dead: int = 0
    resent: int = 0
    schedules_due: bool = False
    # When the next wake-up, lease expiry, re-send or cron slot is due (None: nothing is).
    next_due: datetime | None = None

    @property
    def total(self) -> int:
        return self.woken + self.recovered + self.dead + self.resent


def scheduler_tick(*, batch: int = 500) -> TickResult:
    """One scan, one statement: wake due runs, re-queue runs whose worker died (its lease expired or its
    Postgres session is gone; dead-letter past DEX_MAX_RECOVERIES), re-send wake-ups nobody claimed, and say
    when the next of those is due. Several schedulers may tick at once: SKIP LOCKED gives each row to one of
    them. Enqueues after commit."""
    result = TickResult()
    # One statement is its own transaction (autocommit): the enqueues below run once it has committed.
    with hot_cursor() as cur:
        cur.execute(
            _TICK_SQL,
            {
                "batch": batch,
                "max_recoveries": settings.DEX_MAX_RECOVERIES,
                "stale": settings.DEX_REQUEUE_STALE_SECONDS,
            },
        )
        rows = cur.fetchall()
    for kind, run_id, queue, priority, at in rows:
        if kind == "schedules":
            result.schedules_due = True
            continue
        if kind == "next":
            result.next_due = at
            continue
        setattr(result, kind, getattr(result, kind) + 1)
        if kind == "dead":
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.FAILED), to_runs_list=True)
            continue
        if kind == "recovered":
            priority = max(priority, RECOVERY_PRIORITY)
        enqueue_on_commit(run_id, queue=queue, priority=priority)
        if kind != "resent":
            realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)
    if result.dead:
        _release_dead_letter_slots([run_id for kind, run_id, *_ in rows if kind == "dead"])
    return result


def _release_dead_letter_slots(run_ids: list[Any]) -> None:
    """A dead-lettered run left `running` without settling: hand its concurrency slot on (flow control)."""

    groups = set(
        Run.objects.filter(pk__in=run_ids, concurrency_key_value__isnull=False).values_list(
            "task_id", "concurrency_key_value"
        )
    )
    for task_id, ckey in groups:
        task = registry.get(task_id) if task_id in registry else None
        release_slots(task_id=task_id, ckey=ckey, task=task)
