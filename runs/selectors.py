"""Reads: one run with its steps, and the run list (filters, keyset pagination). Writes live in services.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from django.db import connection
from django.db.models import Aggregate, Count, DurationField, ExpressionWrapper, F, Q, QuerySet, Sum
from django.utils import timezone

from runs.ids import uuid7_floor
from runs.models import AuditEntry, Run, RunStatus

RUN_LIST_DEFAULT_LIMIT = 50
# How far apart a run's id time and its created_at may be (both read the same clock when the run is made).
ID_CLOCK_SLACK = timedelta(minutes=1)
RUN_LIST_MAX_LIMIT = 200


class InvalidCursor(ValueError):
    """A `cursor` that no run list ever handed out."""


@dataclass(frozen=True)
class RunPage:
    items: list[Run]
    # Pass back as `cursor` for the next (older) page; None on the last page.
    next_cursor: str | None


def run_get(*, run_id: UUID | str) -> Run:
    """One run. Raises Run.DoesNotExist."""
    return Run.objects.get(pk=run_id)


def run_get_with_steps(*, run_id: UUID | str) -> Run:
    """One run with its steps loaded, in order (`run.steps.all()` costs no further query)."""
    return Run.objects.prefetch_related("steps").get(pk=run_id)


def run_list(
    *,
    statuses: Sequence[str] = (),
    task_id: str | None = None,
    tag: str | None = None,
    version: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: str | None = None,
    search: str | None = None,
    limit: int = RUN_LIST_DEFAULT_LIMIT,
    top_level: bool = False,
) -> RunPage:
    """Runs newest first, `limit` at a time (at most RUN_LIST_MAX_LIMIT).

    Pagination is a keyset on the primary key: ids are UUIDv7, so "older than the last row seen" is
    `id < cursor`, an index range scan however deep the page, and a page never skips or repeats a run when
    new runs arrive meanwhile (an offset would). `search` is a run id or an idempotency key. There is no
    COUNT(*): one extra row tells whether another page exists. The rows leave out `payload` and `output`,
    which can be a megabyte each; `run_get` has them.
    Raises InvalidCursor for a cursor that isn't one.
    """
    limit = max(1, min(limit, RUN_LIST_MAX_LIMIT))
    filters = RunListFilters(
        statuses=tuple(statuses),
        task_id=task_id or "",
        tag=tag or "",
        version=version or "",
        created_after=created_after,
        created_before=created_before,
        search=search or "",
        top_level=top_level,
    )
    runs = run_queryset(filters=filters).defer("payload", "output").order_by("-id")
    if cursor:
        runs = runs.filter(id__lt=_decode_cursor(cursor))
    rows = list(runs[: limit + 1])
    more = len(rows) > limit
    items = rows[:limit]
    return RunPage(items=items, next_cursor=_encode_cursor(items[-1].id) if more else None)


@dataclass(frozen=True)
class RunListFilters:
    """What the run list (and a bulk action "by filter") narrows runs to. Empty fields don't filter."""

    statuses: tuple[str, ...] = ()
    task_id: str = ""
    tag: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    # A run id or an idempotency key, exactly.
    search: str = ""
    # The code version the run started on (ctx.patched; DESIGN §2).
    version: str = ""
    # Only runs without a parent: the dashboard's list nests child runs under their parent (DESIGN §6).
    top_level: bool = False

    @property
    def is_empty(self) -> bool:
        return replace(self, top_level=False) == RunListFilters()

    def matches(self, run: Run) -> bool:
        """Whether `run` passes these filters: the live run list decides in memory whether a pushed run belongs
        on a filtered page, without a query per event."""
        if self.statuses and run.status not in self.statuses:
            return False
        if self.task_id and run.task_id != self.task_id:
            return False
        if self.tag and self.tag not in (run.tags or []):
            return False
        if self.created_after is not None and not run.created_at > self.created_after:
            return False
        if self.created_before is not None and not run.created_at < self.created_before:
            return False
        if self.version and run.code_version != self.version:
            return False
        if self.top_level and run.parent_id is not None:
            return False
        if self.search:
            return self.search in (str(run.pk), run.idempotency_key)
        return True


def _shifted(when: datetime, by: timedelta) -> datetime:
    """`when + by`, held at the first or last datetime: a filter may name 0001-01-01 or 9999-12-31, where the
    id bound's slack would overflow (and an id bound there is no bound anyway)."""
    try:
        return when + by
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC) if by < timedelta(0) else datetime.max.replace(tzinfo=UTC)


def run_queryset(*, filters: RunListFilters) -> QuerySet[Run]:
    """The runs passing `filters`, unordered and unsliced (the run list pages it; bulk actions cap it)."""
    runs = Run.objects.all()
    if filters.top_level:
        runs = runs.filter(parent__isnull=True)
    if filters.statuses:
        runs = runs.filter(status__in=list(filters.statuses))
    if filters.task_id:
        runs = runs.filter(task_id=filters.task_id)
    if filters.version:
        runs = runs.filter(code_version=filters.version)  # run_version_idx
    if filters.tag:
        # `contains` on the array is `tags @> ARRAY[tag]`, which the GIN index run_tags_idx serves.
        runs = runs.filter(tags__contains=[filters.tag])
    # created_at has no index; the id (a uuid7 minted a moment before created_at is set) does, so a date range
    # is also an id range: the run list's `ORDER BY id DESC LIMIT n` starts at the window instead of scanning
    # every newer run. ID_CLOCK_SLACK keeps a run whose id and created_at straddle the bound.
    if filters.created_after is not None:
        runs = runs.filter(
            created_at__gt=filters.created_after, id__gte=uuid7_floor(_shifted(filters.created_after, -ID_CLOCK_SLACK))
        )
    if filters.created_before is not None:
        runs = runs.filter(
            created_at__lt=filters.created_before, id__lt=uuid7_floor(_shifted(filters.created_before, ID_CLOCK_SLACK))
        )
    if filters.search:
        # A key is only ever compared with `<> ''` excluded, so the planner can use the partial index
        # run_idempotency_idx (task_id, idempotency_key) rather than reading every run.
        by_key = Q(idempotency_key=filters.search) & ~Q(idempotency_key="")
        try:
            runs = runs.filter(Q(pk=UUID(filters.search)) | by_key)
        except ValueError:
            runs = runs.filter(by_key)
    return runs


# Counters above this show as "10,000+".
RUN_COUNT_CAP = 10_000


@dataclass(frozen=True)
class StatusCount:
    status: str
    label: str
    # Counted up to RUN_COUNT_CAP + 1: more than the cap means "at least".
    count: int

    @property
    def display(self) -> str:
        return f"{RUN_COUNT_CAP:,}+" if self.count > RUN_COUNT_CAP else f"{self.count:,}"


def run_status_counts() -> list[StatusCount]:
    """How many runs are in each status, each counted only up to RUN_COUNT_CAP + 1.

    One statement for all statuses: per status a `LIMIT cap+1` subquery, an index-only range scan of
    run_status_idx (status, -id), so the cost is bounded by 8 x (cap+1) index entries however many runs
    there are — never a COUNT(*) over the table, which on Postgres reads every row.
    """
    table = connection.ops.quote_name(Run._meta.db_table)
    capped = f"(SELECT count(*) FROM (SELECT 1 FROM {table} WHERE status = %s LIMIT %s) AS capped)"
    sql = "SELECT " + ", ".join([capped] * len(RunStatus))
    params: list[object] = []
    for status in RunStatus:
        params += [status.value, RUN_COUNT_CAP + 1]
    with connection.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    return [StatusCount(s.value, s.label, n) for s, n in zip(RunStatus, row, strict=True)]


AUDIT_PAGE_SIZE = 50


@dataclass(frozen=True)
class AuditPage:
    items: list[AuditEntry]
    # Pass back as `before` for the next (older) page; None on the last page.
    next_before: int | None


def audit_entries(*, before: int | None = None, limit: int = AUDIT_PAGE_SIZE) -> AuditPage:
    """The audit log newest first, keyset-paginated on the id like the run list (no COUNT(*), no OFFSET)."""
    entries = AuditEntry.objects.order_by("-id")
    if before is not None:
        entries = entries.filter(id__lt=before)
    rows = list(entries[: limit + 1])
    items = rows[:limit]
    return AuditPage(items=items, next_before=items[-1].id if len(rows) > limit else None)


def _encode_cursor(run_id: UUID) -> str:
    # The last id seen, as is: opaque to clients by contract, readable in a log line.
    return str(run_id)


def _decode_cursor(cursor: str) -> UUID:
    try:
        return UUID(cursor)
    except ValueError:
        raise InvalidCursor(f"{cursor[:100]!r} is not a cursor from a previous page") from None


@dataclass(frozen=True)
class UsageRow:
    task_id: str
    day: datetime
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    cached_calls: int


def llm_usage_by_task_and_day(*, days: int = 30) -> list[UsageRow]:
    """LLM calls, tokens and cost per task and day, from the usage recorded on completed `ai` steps
    (one aggregate over the partial index on LLM steps' finished_at)."""
    with connection.cursor() as cur:
        cur.execute(
            """SELECT r.task_id, date_trunc('day', s.finished_at) AS day, count(*),
                      coalesce(sum((s.meta->'usage'->>'input_tokens')::bigint), 0),
                      coalesce(sum((s.meta->'usage'->>'output_tokens')::bigint), 0),
                      coalesce(sum((s.meta->'usage'->>'cost_usd')::numeric), 0),
                      count(*) FILTER (WHERE (s.meta->'usage'->>'cached')::boolean)
                 FROM runs_step s JOIN runs_run r ON r.id = s.run_id
                WHERE s.kind = 'ai' AND s.status = 'completed'
                  AND s.finished_at >= now() - make_interval(days => %s)
                GROUP BY 1, 2 ORDER BY 2 DESC, 6 DESC""",
            [days],
        )
        return [UsageRow(*row) for row in cur.fetchall()]


def llm_spend_totals(*, days: int = 30) -> dict[str, Decimal]:
    """What runs created in the last `days` spent on LLM calls and what memoisation and the cache saved them."""
    since = uuid7_floor(timezone.now() - timedelta(days=days))
    totals = Run.objects.filter(id__gte=since).aggregate(cost=Sum("cost_usd"), saved=Sum("saved_usd"))
    return {"cost_usd": totals["cost"] or Decimal(0), "saved_usd": totals["saved"] or Decimal(0)}


# --- task stats ---------------------------------------------------------------------------------------------

TASK_STATS_WINDOW = timedelta(hours=24)


class Median(Aggregate):
    """Postgres `percentile_cont(0.5) WITHIN GROUP (ORDER BY ...)`: the p50 of an interval or a number."""

    function = "percentile_cont"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    allow_distinct = False


@dataclass(frozen=True)
class TaskStats:
    """A task's runs created in the stats window: how many, how they ended, how long they took, what they spent."""

    runs: int = 0
    finished: int = 0
    failed: int = 0
    p50: timedelta | None = None
    cost_usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.finished if self.finished else None

    @property
    def failure_percent(self) -> str:
        rate = self.failure_rate
        return "—" if rate is None else f"{rate * 100:.0f}%"

    @property
    def success_percent(self) -> str:
        rate = self.failure_rate
        return "—" if rate is None else f"{(1 - rate) * 100:.0f}%"

    @property
    def p50_seconds(self) -> float | None:
        return self.p50.total_seconds() if self.p50 is not None else None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def task_stats(task_ids: Sequence[str], *, window: timedelta = TASK_STATS_WINDOW) -> dict[str, TaskStats]:
    """Per task, over the runs created in the last `window`: runs, failure rate (of the finished ones), p50
    duration (of the completed ones), LLM cost, and the tokens of their LLM steps. Two grouped queries, each
    bounded by the window: runs by id on the (task_id, -id) index, LLM steps on the partial index
    step_ai_finished_idx (a run's steps finish after it was created, so its steps in the window are all there).
    """
    if not task_ids:
        return {}
    since = timezone.now() - window
    failed = [RunStatus.FAILED, RunStatus.TIMED_OUT]
    finished = [RunStatus.COMPLETED, *failed, RunStatus.CANCELED]
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    rows = (
        Run.objects.filter(task_id__in=list(task_ids), id__gte=uuid7_floor(since))
        .order_by()
        .values("task_id")
        .annotate(
            runs=Count("id"),
            finished=Count("id", filter=Q(status__in=finished)),
            failed=Count("id", filter=Q(status__in=failed)),
            p50=Median(
                duration,
                filter=Q(status=RunStatus.COMPLETED, started_at__isnull=False, finished_at__isnull=False),
                output_field=DurationField(),
            ),
            cost=Sum("cost_usd"),
        )
    )
    with connection.cursor() as cur:
        cur.execute(
            """SELECT r.task_id, coalesce(sum((s.meta->'usage'->>'input_tokens')::bigint), 0),
                      coalesce(sum((s.meta->'usage'->>'output_tokens')::bigint), 0)
                 FROM runs_step s JOIN runs_run r ON r.id = s.run_id
                WHERE s.kind = 'ai' AND s.finished_at >= %s AND r.id >= %s AND r.task_id = ANY(%s)
                GROUP BY 1""",
            [since, uuid7_floor(since), list(task_ids)],
        )
        tokens = {task_id: (int(i), int(o)) for task_id, i, o in cur.fetchall()}
    return {
        row["task_id"]: TaskStats(
            runs=row["runs"],
            finished=row["finished"],
            failed=row["failed"],
            p50=row["p50"],
            cost_usd=row["cost"] or Decimal(0),
            input_tokens=tokens.get(row["task_id"], (0, 0))[0],
            output_tokens=tokens.get(row["task_id"], (0, 0))[1],
        )
        for row in rows
    }
