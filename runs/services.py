"""Writes that operators and API clients start: trigger, cancel, retry, replay. Thin over the engine,
which owns every state transition; each service completes its change and schedules its side effects
(enqueue, publish) on commit."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from runs import engine, realtime
from runs.engine import flow
from runs.models import ApiKey, Run, RunStatus
from runs.sdk.registry import registry


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
    now = timezone.now()
    with transaction.atomic():
        if idempotency_key:
            # Serialise triggers of the same key (no unique constraint can express "within the TTL").
            # \x1f separates the two, not NUL: a Postgres text parameter can't hold NUL.
            with connection.cursor() as cur:
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    [f"{task_id}\x1f{idempotency_key}"],
                )
            existing = (
                Run.objects.filter(task_id=task_id, idempotency_key=idempotency_key, idempotency_expires_at__gt=now)
                .order_by("-id")
                .first()
            )
            if existing is not None:
                return existing, False
        ttl = task.idempotency_ttl or settings.DEX_IDEMPOTENCY_TTL_SECONDS
        delayed = bool(delay and delay > 0)
        wake_at = now + timedelta(seconds=delay) if delayed else None
        # Debounce: this trigger supersedes the pending one of its key (a child run is never debounced:
        # its parent waits on it).
        debounce_key, superseded, reason = None, [], ""
        if task.debounce and parent is None:
            debounce_key, starts_at, superseded = flow.debounce_trigger(task=task, payload=stored, now=now)
            delayed, wake_at = True, max(wake_at or starts_at, starts_at)
            reason = flow.debounce_reason(task, debounce_key, wake_at)
        run = Run.objects.create(
            task_id=task_id,
            payload=stored,
            status=RunStatus.DELAYED if delayed else RunStatus.QUEUED,
            wake_at=wake_at,
            enqueued_at=None if delayed else now,
            debounce_key_value=debounce_key,
            status_reason=reason,
            **flow.trigger_fields(task, stored),
            tags=list(tags or []),
            priority=task.priority if priority is None else priority,
            queue=task.queue or settings.DEX_DEFAULT_QUEUE,
            idempotency_key=idempotency_key or "",
            idempotency_expires_at=now + timedelta(seconds=ttl) if idempotency_key else None,
            parent=parent,
            replay_of=replay_of,
        )
        flow.debounce_supersede(superseded=superseded, by=run)
        if not delayed:
            engine.enqueue_on_commit(run.id, queue=run.queue, priority=run.priority)
        realtime.publish_on_commit(realtime.run_changed(run.id, run.status, task=task_id), to_runs_list=True)
    return run, True


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
    from runs.models import Step, StepStatus

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
    with transaction.atomic():
        fork = Run.objects.create(
            task_id=run.task_id,
            payload=run.payload,
            tags=run.tags,
            priority=run.priority,
            queue=run.queue,
            replay_of=run,
            enqueued_at=timezone.now(),
            **(flow.trigger_fields(registry.get(run.task_id), run.payload) if run.task_id in registry else {}),
            metadata={"forked_from": {"run": str(run.id), "step": step_key, "edited": output is not _UNCHANGED}},
        )
        Step.objects.bulk_create(
            Step(
                run=fork,
                seq=step.seq,
                key=step.key,
                kind=step.kind,
                status=StepStatus.COMPLETED,
                attempts=step.attempts,
                budget_used=step.budget_used,
                output=step.output,
                started_at=step.started_at,
                finished_at=step.finished_at,
                meta={**step.meta, "reused_from": str(run.id)},
            )
            for step in reused
        )
        engine.enqueue_on_commit(fork.id, queue=fork.queue, priority=fork.priority)
        realtime.publish_on_commit(realtime.run_changed(fork.id, fork.status, task=fork.task_id), to_runs_list=True)
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
