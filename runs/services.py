"""Writes that operators and API clients start: trigger, cancel, retry, replay, fork, bulk actions, events,
approvals, API keys. Thin over the engine, which owns every state transition; each service completes its change,
schedules its side effects (enqueue, publish) on commit, and records who did it (`by`, an ops.audit.Actor) in the
audit log in the same transaction — whether the call came from the dashboard, the API, the admin or the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

import pydantic
from django import forms
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string

from runs import engine
from runs.models import (
    ACTIVE_STATUSES,
    ApiKey,
    AuditEntry,
    Event,
    Run,
    RunStatus,
    Step,
    StepStatus,
    Waitpoint,
    WaitpointKind,
)
from runs.ops.audit import Actor, audit_record, is_operator
from runs.sdk.registry import UnknownTask, registry
from runs.selectors import RunListFilters, run_queryset


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
    by: Actor | None = None,
    strict_idempotency: bool = False,
) -> tuple[Run, bool]:
    """Create a run of `task_id` (validating its payload) and enqueue it on commit.

    Returns (run, created): with an `idempotency_key` already used for this task within its TTL, the
    existing run and False. Raises runs.sdk.registry.UnknownTask and pydantic.ValidationError, and with
    `strict_idempotency` runs.engine.create.IdempotencyConflict for the same key with another payload.

    A trigger by a person (`by`: dashboard, CLI) is audited; the API's and the scheduler's triggers are the
    product's own traffic, recorded by the runs themselves.
    """
    task = registry.get(task_id)
    stored = payload if validated else task.validate_payload(payload)
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    # Audited triggers write the audit entry in the run's transaction; the API's are one INSERT (run_create).
    with transaction.atomic(savepoint=False) if by is not None else nullcontext():
        run, created = engine.run_create(
            task=task,
            payload=stored,
            idempotency_key=idempotency_key,
            tags=tags or (),
            delay=delay,
            priority=priority,
            parent_id=parent.pk if parent is not None else None,
            replay_of_id=replay_of.pk if replay_of is not None else None,
            strict_idempotency=strict_idempotency,
        )
        if by is not None:
            audit_record(by=by, action="trigger", run_ids=[run.pk], task=task_id, created=created)
    return run, created


def run_cancel(*, run: Run, by: Actor) -> Run:
    """Cancel a run and every unfinished run below it (children, their children...). Raises RunStateError if
    the run had already finished."""
    with transaction.atomic():
        _cancel(run)
        audit_record(by=by, action="cancel", run_ids=[run.pk])
    run.refresh_from_db()
    return run


def run_retry(*, run: Run, by: Actor) -> Run:
    """Resume a failed, timed-out or canceled run from the step that failed."""
    with transaction.atomic():
        _retry(run)
        audit_record(by=by, action="retry", run_ids=[run.pk])
    run.refresh_from_db()
    return run


def run_replay(*, run: Run, by: Actor, payload: dict | None = None, tags: list[str] | None = None) -> Run:
    """Start a new run of the same task with the same (or an edited) payload, linked to the first."""
    with transaction.atomic():
        new = _replay(run, payload=payload, tags=tags)
        audit_record(
            by=by, action="replay", run_ids=[run.pk, new.pk], new_run=str(new.pk), payload_edited=payload is not None
        )
    return new


def _cancel(run: Run) -> None:
    if engine.run_cancel_tree(run.id) is None:
        raise RunStateError(f"run {run.id} has already finished ({run.status}); nothing to cancel")


def _retry(run: Run) -> None:
    if not engine.run_retry_from_failed_step(run.id):
        raise RunStateError(f"only a failed, timed-out or canceled run can be retried; this one is {run.status}")


def _replay(run: Run, *, payload: dict | None = None, tags: list[str] | None = None) -> Run:
    new, _ = run_trigger(
        task_id=run.task_id,
        payload=run.payload if payload is None else payload,
        tags=run.tags if tags is None else tags,
        priority=run.priority,
        replay_of=run,
    )
    return new


_UNCHANGED = object()


def run_fork(*, run: Run, step_key: str, by: Actor, output: Any = _UNCHANGED) -> Run:
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
    edited = output is not _UNCHANGED
    with transaction.atomic():
        fork, _ = engine.run_create(
            task=task,
            payload=run.payload,
            tags=run.tags,
            priority=run.priority,
            replay_of_id=run.pk,
            metadata={"forked_from": {"run": str(run.id), "step": step_key, "edited": edited}},
            steps=reused,
        )
        audit_record(
            by=by, action="fork", run_ids=[run.pk, fork.pk], new_run=str(fork.pk), step=step_key, output_edited=edited
        )
    return fork


def payload_size(payload: Any) -> int:
    return len(json.dumps(payload).encode())


def run_id_or_none(value: str) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None


# --- bulk actions (DESIGN.md §3) -------------------------------------------------------------------------------
# Bulk actions on runs (DESIGN.md §3): retry, cancel or replay a selection or everything a filter matches.
#
# Two steps. `runs_bulk_preview` is the dry run: how many runs the action would touch (a count capped at the
# action's limit, never a COUNT(*) over the table) and a few of them. `runs_bulk_apply` then acts through
# runs.services, one run at a time (each its own short transaction: no lock is held across the batch), and
# records one audit entry naming every run it acted on.
#
# A bulk action by filter acts on runs no newer than the newest one the preview counted (`upto`), so runs
# created between the dry run and the confirmation are not swept in unannounced.

BulkAction = Literal["retry", "cancel", "replay"]
BULK_ACTIONS: tuple[BulkAction, ...] = ("retry", "cancel", "replay")

# The most runs one bulk action touches (newest first); run it again for the rest. Replay starts a new run
# per run, so it gets the smallest batch.
BULK_LIMITS: dict[str, int] = {"retry": 1000, "cancel": 1000, "replay": 100}

# The statuses an action can apply to; the others would only be skipped.
_ELIGIBLE: dict[str, tuple[str, ...]] = {
    "retry": (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CANCELED),
    "cancel": tuple(ACTIVE_STATUSES),
    "replay": (),  # any run can be replayed
}

SAMPLE_SIZE = 10


class BulkError(ValueError):
    """A bulk request that names no runs, both a selection and a filter, or an unknown action."""


@dataclass(frozen=True)
class BulkPreview:
    action: str
    # Runs the action would act on, counted up to limit + 1.
    count: int
    limit: int
    sample: list[Run]
    # The newest run counted: applying by filter acts on no newer run.
    upto: UUID | None
    # For a selection: how many runs were selected (some may not be eligible).
    selected: int | None = None

    @property
    def over_limit(self) -> bool:
        return self.count > self.limit

    @property
    def will_act_on(self) -> int:
        return min(self.count, self.limit)


@dataclass(frozen=True)
class BulkResult:
    action: str
    done: list[UUID]
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why
    created: list[UUID] = field(default_factory=list)  # replay: the new runs
    entry: AuditEntry | None = None


def runs_bulk_preview(
    *,
    filters: RunListFilters | None = None,
    run_ids: Sequence[UUID | str] | None = None,
    action: BulkAction | None = None,
) -> BulkPreview:
    """The dry run: how many runs `action` would act on (at most its limit + 1 are counted) and a sample."""
    action_name = action or "replay"
    limit = BULK_LIMITS[action_name]
    ids = list(_target(action=action_name, filters=filters, run_ids=run_ids).values_list("pk", flat=True)[: limit + 1])
    sample = list(Run.objects.defer("payload", "output").filter(pk__in=ids[:SAMPLE_SIZE]).order_by("-id"))
    return BulkPreview(
        action=action_name,
        count=len(ids),
        limit=limit,
        sample=sample,
        upto=ids[0] if ids else None,
        selected=len(_parse_ids(run_ids)) if run_ids is not None else None,
    )


def runs_bulk_apply(
    *,
    by: Actor,
    action: BulkAction,
    run_ids: Sequence[UUID | str] | None = None,
    filters: RunListFilters | None = None,
    upto: UUID | str | None = None,
) -> BulkResult:
    """Retry, cancel or replay the selected runs (`run_ids`) or those `filters` match (no newer than `upto`),
    at most BULK_LIMITS[action] of them, newest first. A run whose state changed meanwhile is skipped, with
    the reason. Raises BulkError for a malformed request, PermissionDenied for a non-operator."""
    if action not in BULK_ACTIONS:
        raise BulkError(f"unknown bulk action {action!r}")
    if not is_operator(by.user):
        raise PermissionDenied("only operators can act on runs")
    runs = _target(action=action, filters=filters, run_ids=run_ids)
    if upto:
        runs = runs.filter(pk__lte=UUID(str(upto)))
    if action != "replay":  # replay copies the payload; the others don't need a megabyte per run
        runs = runs.defer("payload", "output")
    done: list[UUID] = []
    created: list[UUID] = []
    skipped: dict[str, str] = {}
    for run in runs[: BULK_LIMITS[action]]:
        try:
            if action == "retry":
                _retry(run)
            elif action == "cancel":
                _cancel(run)
            else:
                created.append(_replay(run).pk)
        except (RunStateError, UnknownTask, pydantic.ValidationError) as exc:
            skipped[str(run.pk)] = str(exc)[:200]
            continue
        done.append(run.pk)
    detail: dict[str, Any] = {"scope": "selection" if run_ids is not None else "filter", "count": len(done)}
    if filters is not None:
        detail["filters"] = _filters_json(filters)
    if skipped:
        detail["skipped"] = skipped
    if created:
        detail["created"] = [str(pk) for pk in created]
    entry = audit_record(by=by, action=f"bulk_{action}", run_ids=done, **detail)
    return BulkResult(action=action, done=done, skipped=skipped, created=created, entry=entry)


def _target(*, action: str, filters: RunListFilters | None, run_ids: Sequence[UUID | str] | None) -> QuerySet[Run]:
    if (filters is None) == (run_ids is None):
        raise BulkError("a bulk action takes either a selection of runs or a filter")
    if run_ids is not None:
        runs = Run.objects.filter(pk__in=_parse_ids(run_ids)[: BULK_LIMITS.get(action, 1000)])
    else:
        runs = run_queryset(filters=filters or RunListFilters())
    if _ELIGIBLE.get(action):
        runs = runs.filter(status__in=list(_ELIGIBLE[action]))
    return runs.order_by("-id")


def _parse_ids(run_ids: Sequence[UUID | str] | None) -> list[UUID]:
    parsed = []
    for value in run_ids or ():
        try:
            parsed.append(UUID(str(value)))
        except ValueError:
            continue
    return list(dict.fromkeys(parsed))


def _filters_json(filters: RunListFilters) -> dict[str, Any]:
    return {
        key: (value.isoformat() if hasattr(value, "isoformat") else list(value) if isinstance(value, tuple) else value)
        for key, value in asdict(filters).items()
        if value not in ("", (), None)
    }


# --- API keys ------------------------------------------------------------------------------------------------

# A key's `last_used_at` is written at most this often: a write per request would turn every API read into
# a row update (and a hot row under a busy client).
APIKEY_TOUCH_INTERVAL = timedelta(minutes=1)


class ApiKeyExpired(Exception):
    """The key is valid but past its `expires_at`."""


def apikey_create(
    *,
    name: str,
    by: Actor,
    scopes: list[str] | None = None,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key (every scope unless `scopes` says; no expiry unless `expires_in`). Returns
    (key, secret): the secret is shown once; only its hash is stored."""
    expires_at = timezone.now() + expires_in if expires_in is not None else None
    with transaction.atomic():
        key, secret = ApiKey.generate(name=name, created_by=by.user, scopes=scopes, expires_at=expires_at)
        audit_record(
            by=by,
            action="apikey_create",
            key=key.pk,
            name=key.name,
            prefix=key.prefix,
            scopes=key.scopes,
            expires_at=key.expires_at.isoformat() if key.expires_at else None,
        )
    return key, secret


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


def apikey_revoke(*, key: ApiKey, by: Actor) -> bool:
    """Revoke a key; requests with it fail from now on. False if it was already revoked."""
    now = timezone.now()
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now) == 1
        if revoked:
            audit_record(by=by, action="apikey_revoke", key=key.pk, name=key.name, prefix=key.prefix)
    key.refresh_from_db(fields=["revoked_at"])
    return revoked


# --- events and waitpoints --------------------------------------------------------------------------------------


class WaitpointError(Exception):
    """A waitpoint can't be completed: `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, message: str, *, status: int, details: Any = None):
        super().__init__(message)
        self.status = status
        self.details = details


def event_send(*, name: str, data: Any = None, external_id: str = "", by: Actor | None = None) -> tuple[Event, bool]:
    """Store an event, resume the waits it matches and start the tasks subscribed to it. An `external_id`
    already received returns the first event and does nothing else. Returns (event, created).

    An event sent by a person (`by`: dashboard, CLI) is audited; the API's are the product's traffic."""
    with transaction.atomic(savepoint=False):
        event, created = engine.event_deliver(name=name, data=data, external_id=external_id)
        if by is not None:
            outcome = event.outcome or {}
            audit_record(
                by=by,
                action="event_send",
                run_ids=[*outcome.get("resumed", []), *outcome.get("started", [])],
                event=str(event.pk),
                name=event.name,
                created=created,
            )
    return event, created


def waitpoint_complete(*, token: str, data: Any, by: Actor) -> Waitpoint:
    """Complete a waitpoint by its token. For an approval, `data` is {"approved": bool, "comment": str,
    "data": {...}} with `data` validated by the waitpoint's form; for an event wait, `data` is its result.
    Audited as approve / reject (an approval) or complete (a token wait)."""
    wp = Waitpoint.objects.filter(token=token).select_related("run").first()
    if wp is None:
        raise WaitpointError("no waitpoint has this token", status=404)
    if wp.completed_at is not None:
        raise WaitpointError("this waitpoint was already completed", status=409)
    result = _approval_result(wp, data, by) if wp.kind == WaitpointKind.APPROVAL else data
    with transaction.atomic():
        if not engine.waitpoint_resolve(waitpoint_id=wp.pk, result=result, by=by.user):
            raise WaitpointError("this waitpoint was already completed", status=409)
        if wp.kind == WaitpointKind.APPROVAL:
            action, detail = ("approve" if result["approved"] else "reject"), {"comment": result["comment"]}
        else:
            action, detail = "waitpoint_complete", {}
        audit_record(by=by, action=action, run_ids=[wp.run_id], step=wp.step_key, **detail)
    wp.refresh_from_db()
    return wp


def _approval_result(wp: Waitpoint, data: Any, by: Actor) -> dict:
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
    return {"approved": approved, "by": by.username, "comment": comment, "data": fields}
