"""Creating runs: the one path every new run takes — a trigger (API, dashboard, CLI, schedule, event), a child
run of `ctx.invoke` / `ctx.map`, a replay, a fork, and `runs.testing`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from runs import realtime
from runs.engine.dispatch import enqueue_on_commit
from runs.engine.flow import debounce_reason, debounce_supersede, debounce_trigger, trigger_fields
from runs.engine.hooks import trace_run_context
from runs.models import Run, RunStatus, Step, StepStatus
from runs.sdk import Task

# The longest a trigger may delay a run (about ten years): past it a datetime overflows. Every way in (API,
# dashboard, CLI) refuses more; run_create refuses it too, as a ValueError, for callers that don't.
MAX_DELAY_SECONDS = 10 * 366 * 24 * 3600


class IdempotencyConflict(Exception):
    """A trigger reused an idempotency key with a different payload (Stripe's rule: a key names one request,
    so answering with the first run would silently drop what the second trigger asked for)."""

    def __init__(self, run: Run):
        super().__init__(
            f"idempotency key {run.idempotency_key!r} was already used for task {run.task_id} with a different "
            f"payload: run {run.pk}"
        )
        self.run = run


def run_create(
    *,
    task: Task,
    payload: dict,
    idempotency_key: str | None = None,
    tags: Iterable[str] = (),
    delay: float | None = None,
    priority: int | None = None,
    parent_id: UUID | None = None,
    replay_of_id: UUID | None = None,
    metadata: dict | None = None,
    steps: Sequence[Step] = (),
    strict_idempotency: bool = False,
) -> tuple[Run, bool]:
    """Create a run of `task` with an already validated `payload` and enqueue it on commit (or park it until
    `delay` seconds from now). `steps` are recorded steps the run starts with (a fork).

    Returns (run, created): with an `idempotency_key` already used for this task within its TTL, the existing
    run and False. With `strict_idempotency` (a key a client chose: API, CLI) a different payload under that
    key raises IdempotencyConflict instead; keys Dex derives itself (a schedule's slot, an event's id, a
    child's index) keep "first one wins", since their source (an edited schedule) may change in between.
    """
    if delay is not None and not 0 <= delay <= MAX_DELAY_SECONDS:
        raise ValueError(f"a delay must be between 0 and {MAX_DELAY_SECONDS:,} seconds, not {delay:g}")
    now = timezone.now()
    debounced = bool(task.debounce and parent_id is None and not steps)
    # A plain trigger is one INSERT, committed on its own (one round trip). An idempotency key, a debounce or
    # copied steps need a transaction; no savepoint when a service's transaction wraps this one (a savepoint is
    # a subtransaction, with an id of its own).
    atomic = bool(idempotency_key or debounced or steps)
    conflict: Run | None = None
    with transaction.atomic(savepoint=False) if atomic else nullcontext():
        if idempotency_key:
            # Serialise triggers of the same key (no unique constraint can express "within the TTL").
            # \x1f separates the two, not NUL: a Postgres text parameter can't hold NUL.
            with connection.cursor() as cur:
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    [f"{task.id}\x1f{idempotency_key}"],
                )
            existing = (
                Run.objects.filter(task_id=task.id, idempotency_key=idempotency_key, idempotency_expires_at__gt=now)
                .order_by("-id")
                .first()
            )
            if existing is not None:
                if not strict_idempotency or existing.payload == payload:
                    return existing, False
                # Raised after the block: raising inside would also doom a transaction the caller holds.
                conflict = existing
        if conflict is None:
            run = _insert(
                task=task,
                payload=payload,
                idempotency_key=idempotency_key,
                tags=tags,
                delay=delay,
                priority=priority,
                parent_id=parent_id,
                replay_of_id=replay_of_id,
                metadata=metadata,
                steps=steps,
                debounced=debounced,
                now=now,
            )
    if conflict is not None:
        raise IdempotencyConflict(conflict)
    return run, True


def _insert(
    *,
    task: Task,
    payload: dict,
    idempotency_key: str | None,
    tags: Iterable[str],
    delay: float | None,
    priority: int | None,
    parent_id: UUID | None,
    replay_of_id: UUID | None,
    metadata: dict | None,
    steps: Sequence[Step],
    debounced: bool,
    now: datetime,
) -> Run:
    """The new run's rows, its wake-up on commit and its live event (run_create's transaction holds)."""
    ttl = task.idempotency_ttl or settings.DEX_IDEMPOTENCY_TTL_SECONDS
    delayed = bool(delay and delay > 0)
    wake_at = now + timedelta(seconds=delay) if delayed and delay else None
    # Debounce: this trigger supersedes the pending one of its key (a child run is never debounced: its
    # parent waits on it; nor is a fork, which resumes recorded work).
    debounce_key, superseded, reason = None, [], ""
    if debounced:
        debounce_key, starts_at, superseded = debounce_trigger(task=task, payload=payload, now=now)
        delayed, wake_at = True, max(wake_at or starts_at, starts_at)
        reason = debounce_reason(task, debounce_key, wake_at)
    run = Run.objects.create(
        task_id=task.id,
        payload=payload,
        status=RunStatus.DELAYED if delayed else RunStatus.QUEUED,
        wake_at=wake_at,
        enqueued_at=None if delayed else now,
        debounce_key_value=debounce_key,
        status_reason=reason,
        **trigger_fields(task, payload),
        tags=list(tags),
        priority=task.priority if priority is None else priority,
        queue=task.queue or settings.DEX_DEFAULT_QUEUE,
        idempotency_key=idempotency_key or "",
        idempotency_expires_at=now + timedelta(seconds=ttl) if idempotency_key else None,
        parent_id=parent_id,
        replay_of_id=replay_of_id,
        metadata=metadata or {},
        trace_context=trace_run_context(task_id=task.id, parent_id=parent_id),
    )
    Step.objects.bulk_create(_copied(step, run) for step in steps)
    debounce_supersede(superseded=superseded, by=run)
    if not delayed:
        enqueue_on_commit(run.id, queue=run.queue, priority=run.priority)
    realtime.publish_on_commit(realtime.run_changed(run.id, run.status, task=task.id), to_runs_list=True)
    return run


def _copied(step: Step, run: Run) -> Step:
    """A recorded step of another run, as a completed step of `run` (a fork reuses what came before)."""
    return Step(
        run=run,
        seq=step.seq,
        key=step.key,
        kind=step.kind,
        status=StepStatus.COMPLETED,
        attempts=step.attempts,
        budget_used=step.budget_used,
        output=step.output,
        started_at=step.started_at,
        finished_at=step.finished_at,
        meta={**step.meta, "reused_from": str(step.run_id)},
    )


def child_idempotency_key(parent_id: Any, step_key: str, index: int) -> str:
    """A child run's key: a parent that re-executes its fan-out finds the children it already started."""
    return f"child:{parent_id}:{step_key}:{index}"
