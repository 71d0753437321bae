"""Retention: delete finished runs older than an age, with everything that belongs to them.

`runs_prune` (used by `manage.py prune_runs` and, with DEX_RETENTION_DAYS, by the scheduler) works in batches:
1. in one short transaction, lock up to `batch_size` eligible runs (oldest finish first, SKIP LOCKED, so a
   concurrent prune or a retry from the dashboard never waits on us) and delete them through Django's
   collector, which cascades to their steps, log lines, token chunks, waitpoints and alerts and sets the
   `parent` / `replay_of` links of runs that point at them to NULL;
2. after the commit, delete the runs' stored outputs (runs.offload: each run's whole blob prefix, orphans
   included), so a rolled-back batch never loses a blob its rows still reference;
3. repeat until a batch comes back short.

Eligible: status in the chosen finished statuses (never delayed/queued/running/waiting), `finished_at` older
than the cutoff (Postgres's clock), and not a child whose parent is still unfinished — a parent waiting on
its children reads their outcomes when it wakes, so those rows must outlive it.
The audit log keeps its entries (history names runs that are gone); each prune that deleted something adds
one entry saying what it deleted and why.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from runs import offload
from runs.ids import uuid7_floor
from runs.models import TERMINAL_STATUSES, Event, LogLine, Run, Step
from runs.ops.audit import Actor, audit_record

log = logging.getLogger("dex.retention")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(d|h|m|s|w)\s*$", re.IGNORECASE)
_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


class BadDuration(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' → timedelta; BadDuration with the accepted forms otherwise."""
    match = _DURATION.match(text or "")
    if match is None:
        raise BadDuration(
            f"{text!r} is not a duration: use a number and a unit, e.g. 30d (days), 12h (hours), 90m (minutes), "
            "45s (seconds) or 2w (weeks)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise BadDuration(f"{text!r} must be more than zero")
    return timedelta(seconds=seconds)


@dataclass
class PruneResult:
    runs: int = 0
    # Rows deleted along with the runs, by model label ("runs.Step": 120, ...).
    related: dict[str, int] = field(default_factory=dict)
    blobs: int = 0
    batches: int = 0
    # A batch came back full when the prune stopped (max_batches): more may be eligible.
    more: bool = False

    def add(self, deleted: dict[str, int]) -> None:
        for label, count in deleted.items():
            if label == Run._meta.label:
                self.runs += count
            elif count:
                self.related[label] = self.related.get(label, 0) + count


def _statuses(statuses: Iterable[str] | None) -> list[str]:
    chosen = list(statuses) if statuses else [str(s) for s in TERMINAL_STATUSES]
    unknown = sorted(set(chosen) - {str(s) for s in TERMINAL_STATUSES})
    if unknown:
        allowed = ", ".join(str(s) for s in TERMINAL_STATUSES)
        raise ValueError(f"can't prune runs by status {', '.join(unknown)}: only finished ones ({allowed})")
    return chosen


def prunable_runs(*, older_than: timedelta, statuses: Iterable[str] | None = None, task: str | None = None) -> QuerySet:
    """The runs a prune with these filters would delete."""
    # Postgres's clock, as everywhere the engine compares times: not this machine's.
    cutoff = RawSQL("now() - make_interval(secs => %s)", [older_than.total_seconds()], models.DateTimeField())
    runs = Run.objects.filter(status__in=_statuses(statuses), finished_at__lt=cutoff)
    if task:
        runs = runs.filter(task_id=task)
    unfinished_parent = Run.objects.filter(pk=OuterRef("parent_id")).exclude(status__in=TERMINAL_STATUSES)
    return runs.filter(~Exists(unfinished_parent))


def runs_prune(
    *,
    older_than: timedelta,
    statuses: Iterable[str] | None = None,
    task: str | None = None,
    batch_size: int = 500,
    max_batches: int | None = None,
    dry_run: bool = False,
    reason: str = "prune_runs",
    by: Actor | None = None,
) -> PruneResult:
    """Delete eligible runs (see the module docstring) in batches of `batch_size`, each its own transaction.
    With `dry_run`, count what would go and delete nothing."""
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    result = PruneResult()
    if dry_run:
        runs = prunable_runs(older_than=older_than, statuses=statuses, task=task)
        result.runs = runs.count()
        result.related = {
            Step._meta.label: Step.objects.filter(run__in=runs).count(),
            LogLine._meta.label: LogLine.objects.filter(run__in=runs).count(),
        }
        return result
    while max_batches is None or result.batches < max_batches:
        with transaction.atomic():
            ids = list(
                prunable_runs(older_than=older_than, statuses=statuses, task=task)
                .order_by("finished_at")
                .select_for_update(skip_locked=True, of=("self",))
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                break
            # only("id"): the collector fetches the runs it deletes; their outputs (maybe stored blobs) not.
            _total, deleted = Run.objects.filter(pk__in=ids).only("id").delete()
        result.batches += 1
        result.add(deleted)
        result.blobs += offload.delete_run_blobs(ids)
        if len(ids) < batch_size:
            break
    else:
        result.more = True
    if result.runs:
        audit_record(
            by=by or Actor.system("retention"),
            action="prune",
            reason=reason,
            older_than_seconds=older_than.total_seconds(),
            statuses=_statuses(statuses),
            task=task or "",
            runs=result.runs,
            related=result.related,
            blobs=result.blobs,
        )
    return result


class ScheduledRetention:
    """The scheduler's retention hook: applies DEX_RETENTION_DAYS at most once every
    DEX_RETENTION_INTERVAL_SECONDS (and keeps going on the next ticks while a backlog remains, a few batches
    a tick so waking runs is never held up for long). Several schedulers may run it: SKIP LOCKED gives each
    run to one of them."""

    MAX_BATCHES_PER_TICK = 4

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, batch_size: int = 500) -> None:
        self.clock = clock
        self.batch_size = batch_size
        self.next_at: float | None = None  # None: due at once (a scheduler's start)

    def tick(self) -> PruneResult | None:
        """Prune if due; the result, or None when retention is off or not due yet. Old events go too
        (DEX_EVENT_RETENTION_SECONDS): a wait's window never reaches back that far."""
        now = self.clock()
        if self.next_at is not None and now < self.next_at:
            return None
        # Set first: a prune that raises (storage unreachable) is tried again next interval, not every tick.
        self.next_at = now + settings.DEX_RETENTION_INTERVAL_SECONDS
        if settings.DEX_EVENT_RETENTION_SECONDS:
            events = events_prune(older_than=timedelta(seconds=settings.DEX_EVENT_RETENTION_SECONDS))
            if events:
                log.info("retention: deleted %d event(s)", events)
        days = settings.DEX_RETENTION_DAYS
        if not days:
            return None
        result = runs_prune(
            older_than=timedelta(days=days),
            batch_size=self.batch_size,
            max_batches=self.MAX_BATCHES_PER_TICK,
            reason=f"DEX_RETENTION_DAYS={days:g}",
        )
        if result.more:
            self.next_at = now  # a backlog (the first prune of a big database) continues next tick
        if result.runs:
            log.info("retention: deleted %d run(s) finished over %g day(s) ago", result.runs, days)
        return result


def events_prune(*, older_than: timedelta, batch_size: int = 5000, max_batches: int = 20) -> int:
    """Delete events received more than `older_than` ago, in batches; how many went. Ids are uuid7, so "older
    than" is an id range on the primary key."""
    floor = uuid7_floor(timezone.now() - older_than)
    deleted = 0
    for _ in range(max_batches):
        ids = list(Event.objects.filter(pk__lt=floor).order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            break
        deleted += Event.objects.filter(pk__in=ids).delete()[0]
    return deleted


def describe(result: PruneResult) -> dict[str, Any]:
    """Counts for printing: runs, each related model's rows, stored outputs."""
    return {"runs": result.runs, **result.related, "stored outputs": result.blobs}
