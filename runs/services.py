"""Writes that operators and API clients start: trigger, cancel, retry, replay. Thin over the engine,
which owns every state transition; each service completes its change and schedules its side effects
(enqueue, publish) on commit."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from uuid import UUID

from django import forms
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from runs import engine
from runs.models import ApiKey, Event, Run, RunStatus, Step, StepStatus, Waitpoint, WaitpointKind
from runs.sdk.registry import UnknownTask, registry


class RunStateError(Exception):
    """The run isn't in a state that allows the action (e.g. retrying a completed run)."""


def run_trigger(
    *,
    task_id: str,
    payload: dict | None = None,
    idempotency_key: str | None = None,
    tags: list[str] | None = None,
    delay: float | timedelta | None = None,
    priority: int | None = None,
    parent: Run | None = None,
    replay_of: Run | None = None,
    validated: bool = False,
) -> tuple[Run, bool]:
    """Create a run of `task_id` (validating its payload) and enqueue it on commit.

    Returns (run, created): with an `idempotency_key` already used for this task within its TTL, the
    existing run and False. Raises runs.sdk.registry.UnknownTask and pydantic.ValidationError.
    """
    task = registry.get(task_id)
    stored = payload if validated else task.validate_payload(payload)
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    return engine.run_create(
        task=task,
        payload=stored,
        idempotency_key=idempotency_key,
        tags=tags or (),
        delay=delay,
        priority=priority,
        parent_id=parent.pk if parent is not None else None,
        replay_of_id=replay_of.pk if replay_of is not None else None,
    )


def run_cancel(*, run: Run) -> Run:
    """Cancel a run and every unfinished run below it (children, their children...). Raises RunStateError if
    the run had already finished."""
    status = engine.run_request_cancel(run.id)
    if status is None:
        raise RunStateError(f"run {run.id} has already finished ({run.status}); nothing to cancel")
    parents = [run.id]
    while parents:
        children = list(
            Run.objects.filter(parent_id__in=parents).exclude(status__in=_finished()).values_list("id", flat=True)
        )
        for child_id in children:
            engine.run_request_cancel(child_id)
        parents = children
    run.refresh_from_db()
    return run


def run_retry(*, run: Run) -> Run:
    """Resume a failed, timed-out or canceled run from the step that failed."""
    if not engine.run_retry_from_failed_step(run.id):
        raise RunStateError(f"only a failed, timed-out or canceled run can be retried; this one is {run.status}")
    run.refresh_from_db()
    return run


def run_replay(*, run: Run, payload: dict | None = None, tags: list[str] | None = None) -> Run:
    """Start a new run of the same task with the same (or an edited) payload, linked to the first."""
    new, _ = run_trigger(
        task_id=run.task_id,
        payload=run.payload if payload is None else payload,
        tags=run.tags if tags is None else tags,
        priority=run.priority,
        replay_of=run,
    )
    return new


_UNCHANGED = object()


def run_fork(*, run: Run, step_key: str, output: Any = _UNCHANGED) -> Run:
    """Time-travel debugging: a new run of the same task and payload that reuses `run`'s recorded steps
    before `step_key` and executes from `step_key` on. With `output`, the step just before `step_key`
    resumes the new run with that output instead of the recorded one."""
    target = Step.objects.filter(run=run, key=step_key).first()
    if target is None:
        raise RunStateError(f"run {run.id} has no step {step_key!r} to fork from")
    reused = list(Step.objects.filter(run=run, seq__lt=target.seq).order_by("seq"))
    if any(step.status != StepStatus.COMPLETED for step in reused):
        raise RunStateError("every step before the fork point must have completed")
    if output is not _UNCHANGED:
        if not reused:
            raise RunStateError(f"{step_key!r} is the first step: there is no earlier output to edit")
        engine.encode_output(output, what=f"the edited output of step {reused[-1].key!r}")
        reused[-1].output = output
    try:
        task = registry.get(run.task_id)
    except UnknownTask as exc:
        raise RunStateError(f"{exc}: a fork needs the task's code") from None
    fork, _ = engine.run_create(
        task=task,
        payload=run.payload,
        tags=run.tags,
        priority=run.priority,
        replay_of_id=run.pk,
        metadata={"forked_from": {"run": str(run.id), "step": step_key, "edited": output is not _UNCHANGED}},
        steps=reused,
    )
    return fork


def _finished() -> list[str]:
    return [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.TIMED_OUT]


def payload_size(payload: Any) -> int:
    return len(json.dumps(payload).encode())


def run_id_or_none(value: str) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None


# --- API keys ------------------------------------------------------------------------------------------------

# A key's `last_used_at` is written at most this often: a write per request would turn every API read into
# a row update (and a hot row under a busy client).
APIKEY_TOUCH_INTERVAL = timedelta(minutes=1)


class ApiKeyExpired(Exception):
    """The key is valid but past its `expires_at`."""


def apikey_create(
    *,
    name: str,
    created_by: Any = None,
    scopes: list[str] | None = None,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key (every scope unless `scopes` says; no expiry unless `expires_in`). Returns
    (key, secret): the secret is shown once; only its hash is stored."""
    expires_at = timezone.now() + expires_in if expires_in is not None else None
    return ApiKey.generate(name=name, created_by=created_by, scopes=scopes, expires_at=expires_at)


def apikey_authenticate(*, secret: str) -> ApiKey | None:
    """The live (not revoked) key whose secret this is, or None; ApiKeyExpired for an expired one. Marks it
    used, at most once a minute."""
    if not secret:
        return None
    key = ApiKey.objects.filter(key_hash=ApiKey.hash(secret), revoked_at__isnull=True).first()
    if key is None:
        return None
    now = timezone.now()
    if key.is_expired(now):
        raise ApiKeyExpired(f"this API key expired at {key.expires_at:%Y-%m-%d %H:%M:%S} UTC; create a new one")
    if key.last_used_at is None or now - key.last_used_at >= APIKEY_TOUCH_INTERVAL:
        # Conditional, so concurrent requests of one client write the row once, not once each.
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - APIKEY_TOUCH_INTERVAL)
        ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def apikey_revoke(*, key: ApiKey) -> bool:
    """Revoke a key; requests with it fail from now on. False if it was already revoked."""
    now = timezone.now()
    revoked = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now) == 1
    key.refresh_from_db(fields=["revoked_at"])
    return revoked


# --- events and waitpoints --------------------------------------------------------------------------------------


class WaitpointError(Exception):
    """A waitpoint can't be completed: `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, message: str, *, status: int, details: Any = None):
        super().__init__(message)
        self.status = status
        self.details = details


def event_send(*, name: str, data: Any = None, external_id: str = "") -> tuple[Event, bool]:
    """Store an event, resume the waits it matches and start the tasks subscribed to it. An `external_id`
    already received returns the first event and does nothing else. Returns (event, created)."""
    return engine.event_deliver(name=name, data=data, external_id=external_id)


def waitpoint_complete(*, token: str, data: Any, by: Any = None) -> Waitpoint:
    """Complete a waitpoint by its token. For an approval, `data` is {"approved": bool, "comment": str,
    "data": {...}} with `data` validated by the waitpoint's form; for an event wait, `data` is its result."""
    wp = Waitpoint.objects.filter(token=token).select_related("run").first()
    if wp is None:
        raise WaitpointError("no waitpoint has this token", status=404)
    if wp.completed_at is not None:
        raise WaitpointError("this waitpoint was already completed", status=409)
    result = _approval_result(wp, data, by) if wp.kind == WaitpointKind.APPROVAL else data
    if not engine.waitpoint_resolve(waitpoint_id=wp.pk, result=result, by=by):
        raise WaitpointError("this waitpoint was already completed", status=409)
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
