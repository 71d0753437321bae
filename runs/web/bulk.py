"""Bulk actions on runs (DESIGN.md §3): retry, cancel or replay a selection or everything a filter matches.

Two steps. `runs_bulk_preview` is the dry run: how many runs the action would touch (a count capped at the
action's limit, never a COUNT(*) over the table) and a few of them. `runs_bulk_apply` then acts through
runs.services, one run at a time (each its own short transaction: no lock is held across the batch), and
records one audit entry naming every run it acted on.

A bulk action by filter acts on runs no newer than the newest one the preview counted (`upto`), so runs
created between the dry run and the confirmation are not swept in unannounced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from uuid import UUID

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from pydantic import ValidationError

from runs import services
from runs.models import ACTIVE_STATUSES, AuditEntry, Run, RunStatus
from runs.ops.audit import audit_record, is_operator
from runs.sdk.registry import UnknownTask
from runs.selectors import RunListFilters, run_queryset

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
    user: Any,
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
    if not is_operator(user):
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
                services.run_retry(run=run)
            elif action == "cancel":
                services.run_cancel(run=run)
            else:
                created.append(services.run_replay(run=run).pk)
        except (services.RunStateError, UnknownTask, ValidationError) as exc:
            skipped[str(run.pk)] = str(exc)[:200]
            continue
        done.append(run.pk)
    detail: dict[str, Any] = {"by": "selection" if run_ids is not None else "filter", "count": len(done)}
    if filters is not None:
        detail["filters"] = _filters_json(filters)
    if skipped:
        detail["skipped"] = skipped
    if created:
        detail["created"] = [str(pk) for pk in created]
    entry = audit_record(user=user, action=f"bulk_{action}", run_ids=done, **detail)
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
