"""Waits for an event or a person: waitpoints, event delivery and completion.

A waitpoint is created in the same transaction that parks its run (settle.run_park), and completed once —
by a matching event, by its token, or by its timeout — with a conditional UPDATE (`completed_at IS NULL`),
so a race between an event, a person and the timer has exactly one winner.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from runs.engine.create import run_create
from runs.engine.transitions import runs_wake
from runs.models import Event, Waitpoint
from runs.sdk.registry import registry

log = logging.getLogger(__name__)


def waitpoint_create(
    *,
    run_id: UUID,
    kind: str,
    step_key: str,
    timeout_at: datetime | None,
    event_name: str = "",
    match: dict | None = None,
    prompt: str = "",
    form: str = "",
) -> Waitpoint:
    return Waitpoint.objects.create(
        run_id=run_id,
        kind=kind,
        step_key=step_key,
        token=secrets.token_urlsafe(24),
        event_name=event_name,
        match=match or {},
        prompt=prompt,
        form=form,
        timeout_at=timeout_at,
    )


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


def event_deliver(*, name: str, data: Any = None, external_id: str = "") -> tuple[Event, bool]:
    """Store an event, resume the waits it matches and start the tasks subscribed to it. An `external_id`
    already received returns the first event and does nothing else. Returns (event, created)."""
    data = {} if data is None else data
    with transaction.atomic():
        with connection.cursor() as cur:
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
        # Complete every open wait for this name whose `match` the data contains, each exactly once.
        with connection.cursor() as cur:
            cur.execute(
                """UPDATE runs_waitpoint SET completed_at = now(), result = %(data)s::jsonb, event_id = %(event)s
                    WHERE kind = 'event' AND event_name = %(name)s AND completed_at IS NULL
                      AND %(data)s::jsonb @> match
                RETURNING run_id""",
                {"data": json.dumps(data), "event": str(event_id), "name": name},
            )
            resumed = [r[0] for r in cur.fetchall()]
        runs_wake(resumed)
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
