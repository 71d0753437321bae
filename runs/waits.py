"""Waits for an event or a person: waitpoints, event delivery and completion by token.

A waitpoint is created in the same transaction that parks its run (engine.run_park), and completed once —
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

from django import forms
from django.db import connection, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from runs import engine
from runs.models import Event, Waitpoint, WaitpointKind
from runs.sdk.registry import registry

log = logging.getLogger(__name__)


class WaitpointError(Exception):
    """A waitpoint can't be completed: `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, message: str, *, status: int, details: Any = None):
        super().__init__(message)
        self.status = status
        self.details = details


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


def event_send(*, name: str, data: Any = None, external_id: str = "") -> tuple[Event, bool]:
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
        engine.runs_wake(resumed)
        started, errors = [], []
        for task in registry.all():
            if name not in task.events:
                continue
            from runs import services

            try:
                run, _ = services.run_trigger(
                    task_id=task.id,
                    payload=data if isinstance(data, dict) else {"data": data},
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


def waitpoint_complete(*, token: str, data: Any, by: Any = None) -> Waitpoint:
    """Complete a waitpoint by its token. For an approval, `data` is {"approved": bool, "comment": str,
    "data": {...}} with `data` validated by the waitpoint's form; for an event wait, `data` is its result."""
    wp = Waitpoint.objects.filter(token=token).select_related("run").first()
    if wp is None:
        raise WaitpointError("no waitpoint has this token", status=404)
    if wp.completed_at is not None:
        raise WaitpointError("this waitpoint was already completed", status=409)
    result = _approval_result(wp, data, by) if wp.kind == WaitpointKind.APPROVAL else data
    with transaction.atomic():
        updated = Waitpoint.objects.filter(pk=wp.pk, completed_at__isnull=True).update(
            completed_at=timezone.now(),
            result=result,
            completed_by=by if getattr(by, "pk", None) else None,
        )
        if not updated:
            raise WaitpointError("this waitpoint was already completed", status=409)
        engine.runs_wake([wp.run_id])
    wp.refresh_from_db()
    return wp


def _approval_result(wp: Waitpoint, data: Any, by: Any) -> dict:
    if not isinstance(data, dict):
        raise WaitpointError("an approval needs an object: {approved, comment?, data?}", status=422)
    approved = data.get("approved")
    if not isinstance(approved, bool):
        raise WaitpointError(
            "`approved` must be true or false",
            status=422,
            details=[{"loc": ["data", "approved"], "msg": "must be a boolean", "type": "bool_type"}],
        )
    comment = data.get("comment", "")
    if not isinstance(comment, str):
        raise WaitpointError(
            "`comment` must be a string",
            status=422,
            details=[{"loc": ["data", "comment"], "msg": "must be a string", "type": "string_type"}],
        )
    fields = data.get("data", {})
    if not isinstance(fields, dict):
        raise WaitpointError(
            "`data` must be an object",
            status=422,
            details=[{"loc": ["data", "data"], "msg": "must be an object", "type": "dict_type"}],
        )
    if wp.form and approved:
        form_class: type[forms.Form] = import_string(wp.form)
        form = form_class(data=fields)
        if not form.is_valid():
            raise WaitpointError(
                "the approval's form data is invalid",
                status=422,
                details=[
                    {"loc": ["data", "data", f], "msg": " ".join(e), "type": "form_error"}
                    for f, e in form.errors.items()
                ],
            )
        fields = json.loads(json.dumps(form.cleaned_data, default=str))
    username = getattr(by, "get_username", lambda: str(by or ""))()
    return {"approved": approved, "by": username, "comment": comment, "data": fields}
