"""Flow control: concurrency limits, rate limits, debounce and priority — enforced in Postgres at claim time,
so they hold across any number of workers on any number of machines.

How it works (the engine calls in here; runs.engine stays the one module that moves run states):

1. At trigger time (`trigger_fields`) a run of a limited task gets its resolved keys: `concurrency_key_value`
   (NULL when the task has no concurrency limit, "" when the limit has no key) and `rate_key_value` (the same
   for the rate limit). A run with both NULL is claimed by the engine's plain one-statement claim.
2. A wake-up for a limited run is a *token to fill a slot of its group* (same task and keys): under a
   transaction-scoped advisory lock per (task, key), `claim_next` counts the group's running runs and its
   recent starts and claims the group's best queued run (priority, then oldest) — not necessarily the run the
   message named, so priority orders the claim whatever order the messages arrive in. The lock is taken in a
   statement of its own, before the counting statement, so the count's snapshot sees every earlier claim.
3. Over a limit, nothing is claimed and the worker returns at once; the group's queued runs get a
   `status_reason` (shown in the dashboard). A concurrency slot is handed on when a running run of the group
   settles or parks (`release_slots`). For a rate limit, the runs that fit the next window get a `wake_at`
   when it opens and the scheduler re-sends them then; each start passes the turn to the group's next run.
   The scheduler's re-send of queued runs nobody claimed is the backstop for lost wake-ups.
4. Debounce (`debounce_trigger`): a trigger replaces the task's delayed run of the same debounce key, which
   ends `canceled` with the reason "superseded"; the new run is delayed by the debounce period, so only the
   last trigger of a quiet period runs, with its payload.

The rate limit is a sliding window: at most `n` runs of a group start in any `period`-long interval. A run
"starts" at its first claim; resuming after a sleep or wait is not a new start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction

from runs import realtime
from runs.engine.dispatch import enqueue_on_commit
from runs.models import Run, RunStatus
from runs.sdk import Task

# Keys longer than this are stored as a digest (the column is 255 characters).
_MAX_KEY = 200


def resolve_key(payload: Any, path: str | None) -> str:
    """The value at the dotted `path` in the payload, as text: the flow-control key of a run.

    No path → "" (one group for the whole task). A missing value or null is the key "null".
    """
    if not path:
        return ""
    value: Any = payload
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = None
        if value is None:
            break
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > _MAX_KEY:
        text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def trigger_fields(task: Task, payload: dict) -> dict[str, str | None]:
    """The flow-control columns of a new run of `task`."""
    return {
        "concurrency_key_value": resolve_key(payload, task.concurrency_key) if task.concurrency else None,
        "rate_key_value": resolve_key(payload, task.rate_key or task.concurrency_key) if task.rate_limit else None,
    }


def broker_priority(priority: int) -> int | None:
    """The Celery message priority for a run's `priority` (higher runs first), or None for the default.

    Brokers speak 0–9; Redis (kombu) serves 0 first, RabbitMQ serves 9 first, so the scale flips for Redis.
    Only ordering among waiting messages is affected; limited groups are ordered exactly by `claim_next`.
    """
    level = max(0, min(9, priority))
    if settings.CELERY_BROKER_URL.split(":", 1)[0].startswith("redis"):
        # Every message gets one: kombu's Redis transport serves a message without a priority first of all, so
        # a run of priority 0 left without one would jump ahead of every prioritised (and recovered) run.
        return 9 - level
    return level or None


def _describe_key(path: str | None, key: str) -> str:
    return f" for {path}={key}" if path else ""


def _hhmmss(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%H:%M:%S UTC")


# --- claim -----------------------------------------------------------------------------------------------------

# Claim the best queued run of a group if its limits allow one more; RETURNING what runs.engine.Claim needs.
_CLAIM_NEXT_SQL = """
WITH candidate AS (
  SELECT id FROM runs_run WHERE {group_queued}
   ORDER BY priority DESC, id
   LIMIT 1)
UPDATE runs_run r
   SET {claim_set}
  FROM candidate
 WHERE r.id = candidate.id AND r.status = 'queued'
   AND (%(climit)s::int IS NULL OR (
        SELECT count(*) FROM runs_run
         WHERE task_id = %(task)s AND concurrency_key_value = %(ckey)s AND status = 'running') < %(climit)s)
   AND (%(rlimit)s::int IS NULL OR r.started_at IS NOT NULL OR (
        SELECT count(*) FROM runs_run
         WHERE task_id = %(task)s AND rate_key_value = %(rkey)s
           AND started_at > statement_timestamp() - make_interval(secs => %(period)s)) < %(rlimit)s)
RETURNING r.id, {returning}
"""

# The state of a group that refused a claim: its running runs, and when the rate window lets one start.
_GROUP_STATE_SQL = """
SELECT (SELECT count(*) FROM runs_run
         WHERE task_id = %(task)s AND concurrency_key_value = %(ckey)s AND status = 'running'),
       (SELECT started_at + make_interval(secs => %(period)s) FROM runs_run
         WHERE task_id = %(task)s AND rate_key_value = %(rkey)s
           AND started_at > statement_timestamp() - make_interval(secs => %(period)s)
         ORDER BY started_at DESC OFFSET greatest(coalesce(%(rlimit)s::int, 1) - 1, 0) LIMIT 1)
"""


@dataclass
class Limits:
    concurrency: int | None
    rate: int | None
    period: float | None

    @classmethod
    def of(cls, task: Task | None) -> Limits:
        if task is None:
            return cls(None, None, None)
        rate, period = task.rate_limit if task.rate_limit else (None, None)
        return cls(task.concurrency, rate, period)


def _lock_names(task_id: str, ckey: str | None, rkey: str | None) -> list[str]:
    # Sorted, so two claimers of groups that share a key take the locks in the same order (no deadlock).
    names = []
    if ckey is not None:
        names.append(f"dex-concurrency\x1f{task_id}\x1f{ckey}")
    if rkey is not None:
        names.append(f"dex-rate\x1f{task_id}\x1f{rkey}")
    return sorted(names)


def claim_next(
    *,
    run_id: UUID | str,
    task_id: str,
    ckey: str | None,
    rkey: str | None,
    task: Task | None,
    params: dict[str, Any],
    claim_set: str,
    returning: str,
) -> tuple | None:
    """Claim the best queued run of `run_id`'s group if its limits allow one more; else mark the group's
    queued runs with why they wait (and, for a rate limit, when to re-send them) and return None.

    `claim_set` and `returning` are the claim's SET and RETURNING clauses (lease.py), `params` its parameters.
    Returns the claimed run's row: its id, then the columns named in `returning`.
    """
    limits = Limits.of(task)
    params = {
        **params,
        "task": task_id,
        "ckey": ckey,
        "rkey": rkey,
        "climit": limits.concurrency if ckey is not None else None,
        "rlimit": limits.rate if rkey is not None else None,
        "period": limits.period or 0,
    }
    with transaction.atomic(), connection.cursor() as cur:
        # Its own statement, before the counting one: under READ COMMITTED a statement's snapshot is taken
        # when it starts, so only a count that starts after the lock is granted sees the previous claimer's.
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(name, 0)) FROM unnest(%s::text[]) AS name",
            [_lock_names(task_id, ckey, rkey)],
        )
        group_queued = _group_queued(ckey, rkey)
        cur.execute(_CLAIM_NEXT_SQL.format(claim_set=claim_set, returning=returning, group_queued=group_queued), params)
        row = cur.fetchone()
        if row is not None:
            if params["rlimit"] is not None:
                # Pass the turn on: the group's next run tries now, and if the window is full its refusal
                # schedules the next ones — a few messages per window, not one per queued run.
                _wake_best(cur, params, group_queued, limit=1)
            return row
        cur.execute(_GROUP_STATE_SQL, params)
        running, window_opens = cur.fetchone()
        reason, wake_at = _refusal(task, params, running=running, window_opens=window_opens)
        if reason:
            # For a rate limit, the runs that fit the next window (no more) get its time in their reason and a
            # wake_at: the scheduler re-sends them then. The rest get a reason that doesn't change from one
            # refusal to the next, and only rows whose reason changes are written: a long queue isn't
            # rewritten on every refusal.
            top = f"SELECT id FROM runs_run WHERE {group_queued} ORDER BY priority DESC, id LIMIT %(top)s"
            values = {**params, "reason": reason, "top": params["rlimit"] if wake_at is not None else 0}
            cur.execute(
                f"""UPDATE runs_run SET status_reason = %(reason)s, enqueued_at = now()
                     WHERE {group_queued} AND status_reason <> %(reason)s AND id NOT IN ({top})""",
                values,
            )
            if wake_at is not None:
                values.update(wake_at=wake_at, dated=f"{reason} until {_hhmmss(wake_at)}")
                cur.execute(
                    f"""UPDATE runs_run SET wake_at = %(wake_at)s, enqueued_at = now(), status_reason = %(dated)s
                         WHERE id IN ({top})
                           AND (wake_at IS DISTINCT FROM %(wake_at)s OR status_reason <> %(dated)s)""",
                    values,
                )
    _publish_waiting(run_id)
    return None


def _group_queued(ckey: str | None, rkey: str | None) -> str:
    """SQL for the queued runs of a group. `= %(key)s` / `IS NULL` rather than `IS NOT DISTINCT FROM`, which
    no index can serve (run_concurrency_idx, run_rate_queued_idx)."""
    ckey_sql = "concurrency_key_value IS NULL" if ckey is None else "concurrency_key_value = %(ckey)s"
    rkey_sql = "rate_key_value IS NULL" if rkey is None else "rate_key_value = %(rkey)s"
    return f"task_id = %(task)s AND status = 'queued' AND {ckey_sql} AND {rkey_sql}"


def _wake_best(cur: Any, params: dict, group_queued: str, *, limit: int) -> None:
    cur.execute(
        f"SELECT id, queue, priority FROM runs_run WHERE {group_queued} ORDER BY priority DESC, id LIMIT %(n)s",
        {**params, "n": limit},
    )
    for run_id, queue, priority in cur.fetchall():
        enqueue_on_commit(run_id, queue=queue, priority=priority)


def _refusal(task: Task | None, params: dict, *, running: int, window_opens: datetime | None) -> tuple[str, Any]:
    """Why the group's queued runs wait, and until when (rate limit) — ("", None) if nothing is queued."""
    climit, rlimit = params["climit"], params["rlimit"]
    if climit is not None and running >= climit:
        where = _describe_key(task.concurrency_key if task else None, params["ckey"] or "")
        return f"waiting for a concurrency slot ({running}/{climit} running{where})", None
    if rlimit is not None and window_opens is not None:
        path = (task.rate_key or task.concurrency_key) if task else None
        where = _describe_key(path, params["rkey"] or "")
        period = f"{params['period']:g}s"
        return f"rate limited ({rlimit} per {period}{where})", window_opens
    return "", None


def _publish_waiting(run_id: UUID | str) -> None:
    realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.QUEUED), to_runs_list=True)


# --- slots handed on -------------------------------------------------------------------------------------------


def release_slots(*, task_id: str, ckey: str, task: Task | None) -> int:
    """A running run of the group settled or parked: wake as many of its best queued runs as there are
    free slots. Each wake-up claims the group's best run (claim_next), so which message arrives first
    doesn't matter. Returns how many were woken."""
    limit = task.concurrency if task is not None and task.concurrency else 1
    with connection.cursor() as cur:
        cur.execute(
            """SELECT id, queue, priority FROM runs_run
                WHERE task_id = %(task)s AND concurrency_key_value = %(ckey)s AND status = 'queued'
                ORDER BY priority DESC, id
                LIMIT greatest(0, %(limit)s - (SELECT count(*) FROM runs_run
                                                WHERE task_id = %(task)s AND concurrency_key_value = %(ckey)s
                                                  AND status = 'running'))""",
            {"task": task_id, "ckey": ckey, "limit": limit},
        )
        rows = cur.fetchall()
    for run_id, queue, priority in rows:
        enqueue_on_commit(run_id, queue=queue, priority=priority)
    return len(rows)


# --- debounce --------------------------------------------------------------------------------------------------


def debounce_trigger(*, task: Task, payload: dict, now: datetime) -> tuple[str, datetime, list[UUID]]:
    """Inside the trigger's transaction: serialise triggers of the same debounce key, and supersede the
    task's pending (delayed) run of that key. Returns (key, when the new run starts, superseded run ids);
    the caller creates the new run, then calls `debounce_supersede`."""
    key = resolve_key(payload, task.debounce_key)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"dex-debounce\x1f{task.id}\x1f{key}"])
    pending = list(
        Run.objects.filter(task_id=task.id, debounce_key_value=key, status=RunStatus.DELAYED).values_list(
            "id", flat=True
        )
    )
    assert task.debounce is not None
    return key, now + timedelta(seconds=task.debounce), pending


def debounce_reason(task: Task, key: str, starts_at: datetime) -> str:
    where = _describe_key(task.debounce_key, key)
    return f"debounced{where}: starts at {_hhmmss(starts_at)} unless triggered again"


def debounce_supersede(*, superseded: list[UUID], by: Run) -> int:
    """End the superseded delayed runs `canceled`, saying which run replaced them."""
    if not superseded:
        return 0
    n = Run.objects.filter(pk__in=superseded, status=RunStatus.DELAYED).update(
        status=RunStatus.CANCELED,
        finished_at=by.created_at,
        wake_at=None,
        status_reason=f"debounced: superseded by a later trigger (run {by.pk})",
    )
    for run_id in superseded:
        realtime.publish_on_commit(realtime.run_changed(run_id, RunStatus.CANCELED), to_runs_list=True)
    return n
