"""Waits for an event or a person: waitpoints, event delivery and completion.

A waitpoint is created in the same transaction that parks its run (settle.run_park), and completed once — by a
matching event, by its token, or by its timeout — with a conditional UPDATE (`completed_at IS NULL`), so a race
between an event, a person and the timer has exactly one winner.

No lost-event race (DESIGN §3): an event counts for a wait if it arrived inside the wait's window — after the
run was created (an event's uuid7 id is newer than the run's: both are stamped by the web tier when they come
in), or, with a `lookback`, from the wait's start minus it (Postgres's clock) — and no earlier wait of the run
consumed it. The two
sides meet under one advisory lock per event name: a delivery holds it exclusively while it stores the event and
completes the open waits it matches; a wait holds it shared while it opens its waitpoint and looks for an event
that came before. Whichever commits second sees the other, so an event is never lost between them. A
waitpoint's `event_id` records what it consumed; a unique (run, event) index makes that at most once per run.

Matching an event against thousands of open waits is index probes, not a scan: a flat `match` (a few top-level
keys with scalar values) is stored as canonical JSON in `match_key`, and an event probes (event_name, match_key)
for every combination of its own top-level scalar pairs. Other matches (nested, or more keys) are few and
compared with jsonb containment.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import combinations
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from runs.engine.create import run_create
from runs.engine.transitions import runs_wake
from runs.ids import uuid7_floor
from runs.models import Event, Waitpoint
from runs.sdk.registry import registry

log = logging.getLogger(__name__)

# A match with at most this many top-level scalar keys is "flat" and found by index probes.
FLAT_MATCH_KEYS = 3
# An event probes this many of its top-level scalar pairs at most (the rest can only match non-flat waits).
PROBED_EVENT_KEYS = 12


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | bool | int | float)


def _canonical(pairs: dict[str, Any]) -> str:
    # jsonb compares 1 and 1.0 as equal; canonical text must too.
    normal = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in pairs.items()}
    return json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def match_key(match: dict[str, Any]) -> str | None:
    """`match` as canonical JSON when it is flat (found by index probes), else None (compared with @>)."""
    if len(match) > FLAT_MATCH_KEYS or not all(_scalar(v) for v in match.values()):
        return None
    return _canonical(match)


def event_match_keys(data: Any) -> list[str]:
    """Every flat match an event's data satisfies: the canonical JSON of each combination of at most
    FLAT_MATCH_KEYS of its top-level scalar pairs (and the empty match)."""
    if not isinstance(data, dict):
        return [_canonical({})]
    scalars = sorted((k, v) for k, v in data.items() if _scalar(v))[:PROBED_EVENT_KEYS]
    return [_canonical(dict(combo)) for size in range(FLAT_MATCH_KEYS + 1) for combo in combinations(scalars, size)]


def _name_lock(cur: Any, name: str, *, shared: bool) -> None:
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    cur.execute(f"SELECT {fn}(hashtextextended(%s, 0))", [f"dex-event\x1f{name}"])


def waitpoint_create(
    *,
    run_id: UUID,
    kind: str,
    step_key: str,
    timeout_at: datetime | None,
    event_name: str = "",
    match: dict | None = None,
    events_after: datetime | None = None,
    prompt: str = "",
    form: str = "",
) -> Waitpoint:
    """Open a waitpoint (inside the park's transaction). A wait for an event first looks for one that arrived
    inside its window and that this run has not consumed: found, the waitpoint is completed with it at once and
    the run goes back to the queue."""
    match = match or {}
    if kind == "event":
        with connection.cursor() as cur:
            _name_lock(cur, event_name, shared=True)
    wp = Waitpoint.objects.create(
        run_id=run_id,
        kind=kind,
        step_key=step_key,
        token=secrets.token_urlsafe(24),
        event_name=event_name,
        match=match,
        match_key=match_key(match) if kind == "event" else None,
        events_after=events_after,
        prompt=prompt,
        form=form,
        timeout_at=timeout_at,
    )
    if kind == "event":
        _take_buffered_event(wp)
    return wp


def _take_buffered_event(wp: Waitpoint) -> None:
    # Without a lookback the window starts at the run's creation: events newer than the run (uuid7 ids order by
    # time, and the bound lets event_name_idx narrow the scan); with one, at `events_after` in Postgres's clock.
    if wp.events_after is None:
        floor, after = str(wp.run_id), None
    else:
        floor, after = str(uuid7_floor(wp.events_after - timedelta(minutes=5))), wp.events_after
    with connection.cursor() as cur:
        cur.execute(
            """WITH candidate AS (
                 SELECT e.id, e.data FROM runs_event e
                  WHERE e.name = %(name)s AND e.id > %(floor)s::uuid
                    AND (%(after)s::timestamptz IS NULL OR e.received_at >= %(after)s)
                    AND (%(match)s::jsonb = '{}'::jsonb OR e.data @> %(match)s::jsonb)
                    AND NOT EXISTS (SELECT 1 FROM runs_waitpoint c WHERE c.run_id = %(run)s AND c.event_id = e.id)
                  ORDER BY e.id LIMIT 1)
               UPDATE runs_waitpoint w SET completed_at = now(), result = candidate.data, event_id = candidate.id
                 FROM candidate WHERE w.id = %(wp)s AND w.completed_at IS NULL
               RETURNING w.run_id""",
            {
                "name": wp.event_name,
                "floor": floor,
                "after": after,
                "match": json.dumps(wp.match),
                "run": str(wp.run_id),
                "wp": wp.pk,
            },
        )
        if cur.fetchone() is not None:
            runs_wake([wp.run_id])


@dataclass
class Outcome:
    done: bool
    result: Any = None
    timeout_at: datetime | None = None


def waitpoint_outcome(*, run_id: UUID, step_key: str) -> Outcome:
    """How the wait of `step_key` ended: completed (its result), timed out (None; expired here, in Postgres
    time, unless something completed it first), or still open."""
    with connection.cursor() as cur:
        cur.execute(
            """UPDATE runs_waitpoint SET completed_at = now(), timed_out = true
                WHERE run_id = %s AND step_key = %s AND completed_at IS NULL AND timeout_at <= now()""",
            [str(run_id), step_key],
        )
    wp = Waitpoint.objects.filter(run_id=run_id, step_key=step_key).first()
    if wp is None:  # recorded as waiting but its waitpoint is gone (pruned): treat as timed out
        return Outcome(done=True)
    if wp.completed_at is not None:
        return Outcome(done=True, result=None if wp.timed_out else wp.result)
    return Outcome(done=False, timeout_at=wp.timeout_at)


# Complete the open waits an event matches, each once, at most one per run (a run has one open wait at a time,
# and the unique (run, event) index holds the rest). Flat matches by index probes; the others by containment.
_DELIVER_SQL = """
WITH matched AS (
  SELECT id FROM runs_waitpoint
   WHERE kind = 'event' AND completed_at IS NULL AND event_name = %(name)s AND match_key = ANY(%(keys)s)
  UNION ALL
  SELECT id FROM runs_waitpoint
   WHERE kind = 'event' AND completed_at IS NULL AND event_name = %(name)s AND match_key IS NULL
     AND %(data)s::jsonb @> match)
UPDATE runs_waitpoint w SET completed_at = now(), result = %(data)s::jsonb, event_id = %(event)s
  FROM matched WHERE w.id = matched.id AND w.completed_at IS NULL
RETURNING w.run_id
"""


def event_deliver(*, name: str, data: Any = None, external_id: str = "") -> tuple[Event, bool]:
    """Store an event, resume the waits it matches and start the tasks subscribed to it. An `external_id`
    already received returns the first event and does nothing else. Returns (event, created)."""
    data = {} if data is None else data
    with transaction.atomic(savepoint=False):
        with connection.cursor() as cur:
            _name_lock(cur, name, shared=False)
            cur.execute(
                """INSERT INTO runs_event (id, name, data, external_id, received_at, outcome)
                   VALUES (%s, %s, %s::jsonb, %s, now(), '{}'::jsonb)
                   ON CONFLICT (external_id) WHERE external_id <> '' DO NOTHING RETURNING id""",
                [str(Event._meta.pk.default()), name, json.dumps(data), external_id],
            )
            row = cur.fetchone()
            if row is None:
                return Event.objects.get(external_id=external_id), False
            event_id = row[0]
            cur.execute(
                _DELIVER_SQL,
                {"name": name, "keys": event_match_keys(data), "data": json.dumps(data), "event": str(event_id)},
            )
            matched = [r[0] for r in cur.fetchall()]
        resumed = runs_wake(matched)
        started, errors = [], []
        for task in registry.all():
            if name not in task.events:
                continue
            try:
                run, _ = run_create(
                    task=task,
                    payload=task.validate_payload(data if isinstance(data, dict) else {"data": data}),
                    idempotency_key=f"event:{event_id}",
                    tags=[f"event:{name}"],
                )
                started.append(str(run.id))
            except Exception as exc:  # one subscriber's bad payload must not lose the event for others
                log.warning("event %s could not start task %s: %s", event_id, task.id, exc)
                errors.append({"task": task.id, "message": str(exc)})
        outcome = {"resumed": [str(r) for r in resumed], "started": started, "errors": errors}
        Event.objects.filter(pk=event_id).update(outcome=outcome)
    return Event.objects.get(pk=event_id), True


def waitpoint_resolve(*, waitpoint_id: int, result: Any, by: Any = None) -> bool:
    """Complete an open waitpoint with `result` and wake its run; False if something completed it first."""
    with transaction.atomic():
        updated = Waitpoint.objects.filter(pk=waitpoint_id, completed_at__isnull=True).update(
            completed_at=timezone.now(),
            result=result,
            completed_by=by if getattr(by, "pk", None) else None,
        )
        if updated:
            run_id = Waitpoint.objects.filter(pk=waitpoint_id).values_list("run_id", flat=True).get()
            runs_wake([run_id])
    return bool(updated)
