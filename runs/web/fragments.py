"""The dashboard's live regions: what each one shows (read from Postgres) and its HTML.

A page template defines one `{% partialdef %}` per region that can change. The HTTP views render the page
with the contexts built here; the websocket consumers render the *same* partials with `oob` set
(`hx-swap-oob` for the htmx ws extension), so a region looks the same whether it came with the page, with the
snapshot sent on (re)connect, or with a push. Readers here are sync (Django ORM): consumers call them through
`database_sync_to_async`. Renderers take loaded objects and never touch the database, so they are safe to
call from the event loop — templates read only a model's own fields, never a relation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django import forms
from django.contrib.postgres.expressions import ArraySubquery
from django.db.models import CharField, Count, F, Func, IntegerField, OuterRef, Subquery
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce, JSONObject
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from runs import selectors
from runs.models import LogLine, Run, Step, StepChunk, StepStatus, Waitpoint, WaitpointKind

RUN_LIST_TEMPLATE = "runs/run_list.html"
RUN_DETAIL_TEMPLATE = "runs/run_detail.html"

# The run list shows the newest runs (filters and pagination come with the full dashboard).
RUN_LIST_LIMIT = 50
# The run page shows the last log lines; older ones stay in Postgres.
LOG_LINES_LIMIT = 500
# ...and the last steps of a long run (the failed one is the last), the first children: the page's cost
# must not grow with the run. The header says how many more exist.
STEPS_LIMIT = 200
CHILDREN_LIMIT = 20


@dataclass(frozen=True)
class PendingStep:
    """A step that started but has not settled: the engine writes a step's row only when it settles
    (ENGINE.md), so a running step's first appearance has no primary key yet and is keyed by its step key."""

    key: str
    attempts: int = 1
    status: str = "running"
    kind: str = ""
    pk: None = None


def step_dom_id(step: Step | PendingStep) -> str:
    if step.pk is not None:
        return f"step-{step.pk}"
    return "step-pending-" + hashlib.blake2s(step.key.encode(), digest_size=8).hexdigest()


# --- reads ------------------------------------------------------------------------------------------------


def run_list_runs(filters: selectors.RunListFilters | None = None) -> list[Run]:
    """The first page of the run list (what the live list shows), newest first, as `filters` narrow it."""
    runs = selectors.run_queryset(filters=filters or selectors.RunListFilters(top_level=True))
    page = list(runs.defer("payload", "output").order_by("-id")[:RUN_LIST_LIMIT])
    annotate_child_counts(page)
    return page


def annotate_child_counts(runs: list[Run]) -> None:
    """Set `child_count` on each run of a list page: one grouped query over the page's ids (the parent FK's
    index), so a row can offer its children nested under it."""
    counts = (
        dict(
            Run.objects.filter(parent_id__in=[run.pk for run in runs])
            .order_by()
            .values("parent_id")
            .annotate(n=Count("pk"))
            .values_list("parent_id", "n")[: len(runs)]  # one group per run of the page at most
        )
        if runs
        else {}
    )
    for run in runs:
        run.child_count = counts.get(run.pk, 0)


def run_children(run_id: UUID | str) -> list[Run]:
    """The first child runs of a run, oldest first (what its row in the list expands to)."""
    return list(Run.objects.filter(parent_id=run_id).defer("payload", "output").order_by("id")[:CHILDREN_LIMIT])


def run_list_counters() -> list[selectors.StatusCount]:
    """Runs per status, each capped (one bounded statement, no COUNT(*) over the table)."""
    return selectors.run_status_counts()


def run_get_or_none(run_id: UUID | str) -> Run | None:
    return Run.objects.filter(pk=run_id).first()


def step_get_or_none(run_id: UUID | str, key: str) -> Step | None:
    return Step.objects.filter(run_id=run_id, key=key).first()


# Which committed state a read saw: "<xmax>-<in-progress count>" of the statement's Postgres snapshot. Of two
# reads of the same run, the later one has a higher xmax, or the same xmax and no more transactions in progress
# (the ones then in progress may since have committed; no new ones began). The page's status regions carry it
# as `data-version`, and static/js/dex.js drops a swap that would replace a region with one read earlier: an
# action's response can arrive after the websocket pushed a newer header.
READ_VERSION_SQL = (
    "(SELECT pg_snapshot_xmax(s)::text || '-' || coalesce(array_length(array(SELECT pg_snapshot_xip(s)), 1), 0)"
    " FROM pg_current_snapshot() AS s)"
)


def run_detail_get_or_none(run_id: UUID | str) -> Run | None:
    """The run with what its header shows besides its own fields, in one query: how many steps, log lines
    and children it has, its first children, its pending waits and the version of the read (attributes
    `step_count`, `steps_completed`, `log_count`, `child_count`, `children_links`, `pending_waits` and `version`)."""
    children = (
        Run.objects.filter(parent_id=OuterRef("pk"))
        .order_by("id")
        .values(j=JSONObject(id="id", task_id="task_id", status="status"))[:CHILDREN_LIMIT]
    )
    waits = (
        Waitpoint.objects.filter(run_id=OuterRef("pk"), completed_at__isnull=True)
        .order_by("id")
        .values(
            j=JSONObject(
                id="id",
                kind="kind",
                step_key="step_key",
                event_name="event_name",
                prompt="prompt",
                form="form",
                timeout_at="timeout_at",
            )
        )
    )
    run = (
        Run.objects.filter(pk=run_id)
        .annotate(
            step_count=_count(Step.objects.filter(run_id=OuterRef("pk"))),
            steps_completed=_count(Step.objects.filter(run_id=OuterRef("pk"), status=StepStatus.COMPLETED)),
            log_count=_count(LogLine.objects.filter(run_id=OuterRef("pk"))),
            child_count=_count(Run.objects.filter(parent_id=OuterRef("pk"))),
            children_json=ArraySubquery(children),
            waits_json=ArraySubquery(waits),
            version=RawSQL(READ_VERSION_SQL, [], output_field=CharField()),
        )
        .first()
    )
    if run is None:
        return None
    run.children_links = list(run.children_json or [])
    run.pending_waits = [PendingWait.from_json(wait) for wait in run.waits_json or []]
    return run


def run_detail_context(
    run_id: UUID | str, *, can_operate: bool = False, step_key: str | None = None
) -> dict[str, Any] | None:
    """Everything the run page shows, or None if there is no such run. A bounded number of queries however
    long the run: the run (with its counts), its last steps, its last log lines, for a live run the
    token chunks of LLM steps still streaming, and with `step_key` the inspected step (and its logs)."""
    run = run_detail_get_or_none(run_id)
    if run is None:
        return None
    last = Step.objects.filter(run_id=run.pk).order_by("-seq")[:STEPS_LIMIT]
    inspected_row: Step | None = None
    if step_key:
        # The inspected step comes with the same statement, also when it is older than the steps shown.
        rows = {row.pk: row for row in last.union(Step.objects.filter(run_id=run.pk, key=step_key), all=True)}
        ordered = sorted(rows.values(), key=lambda row: row.seq)
        inspected_row = next((row for row in ordered if row.key == step_key), None)
        if len(ordered) > STEPS_LIMIT:
            ordered = ordered[1:]  # the one row past the last STEPS_LIMIT: the inspected step, not drawn
    else:
        ordered = list(last)[::-1]
    steps: list[Step | PendingStep] = list(ordered)
    logs = list(LogLine.objects.filter(run_id=run.pk).order_by("-id")[:LOG_LINES_LIMIT])
    logs.reverse()
    tokens: dict[str, str] = {}
    if not run.is_terminal:
        tokens = _streaming_tokens(run.pk)
        settled = {step.key for step in steps}
        # A streaming step has no row until it settles: show it, with its text so far, as a pending row.
        steps += [PendingStep(key=key, kind="ai") for key in tokens if key not in settled]
    step_logs: dict[str, list[LogLine]] = {}
    for line in logs:
        if line.step_key:
            step_logs.setdefault(line.step_key, []).append(line)
    inspected = None
    if step_key:
        # The step's log lines are among the run's last ones unless the run logged more than the page shows.
        known = step_logs.get(step_key, []) if run.log_count <= LOG_LINES_LIMIT else None
        inspected = step_inspector_context(
            run, step_key, step=inspected_row, can_operate=can_operate, tokens=tokens, logs=known, step_read=True
        )
    return {
        "run": run,
        "run_pk": run.pk,
        "inspector": inspected,
        "children": {child["id"]: child for child in run.children_links},
        "steps": steps,
        "hidden_steps": max(run.step_count - STEPS_LIMIT, 0),
        "timeline": Timeline.of(run, steps),
        "tokens": tokens,
        "logs": logs,
        "hidden_logs": max(run.log_count - LOG_LINES_LIMIT, 0),
        "step_logs": step_logs,
        "metadata": sorted(run.metadata.items()) if isinstance(run.metadata, dict) else [],
        "can_operate": can_operate,
    }


def _count(queryset: Any) -> Coalesce:
    # COUNT as a plain function, not an aggregate: no GROUP BY, so the subquery is one row even when empty.
    counted = queryset.order_by().annotate(n=Func(F("pk"), function="COUNT")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def _streaming_tokens(run_pk: UUID) -> dict[str, str]:
    """The text streamed so far by each LLM step of the run not yet completed, from its latest attempt."""
    completed = Step.objects.filter(run_id=run_pk, status=StepStatus.COMPLETED).values("key")
    chunks = (
        StepChunk.objects.filter(run_id=run_pk)
        .exclude(step_key__in=completed)
        .order_by("step_key", "attempt", "seq")
        .values_list("step_key", "attempt", "text")
    )
    latest: dict[str, tuple[int, list[str]]] = {}
    for key, attempt, text in chunks:
        if key not in latest or latest[key][0] != attempt:
            latest[key] = (attempt, [])
        latest[key][1].append(text)
    return {key: "".join(parts) for key, (_attempt, parts) in latest.items()}


def streamed_text(run_pk: UUID | str, key: str) -> str:
    """The text stored so far for one LLM step's latest attempt."""
    rows = StepChunk.objects.filter(run_id=run_pk, step_key=key).order_by("-attempt", "seq")
    latest: int | None = None
    parts: list[str] = []
    for attempt, text in rows.values_list("attempt", "text"):
        if latest is not None and attempt != latest:
            break
        latest = attempt
        parts.append(text)
    return "".join(parts)


@dataclass(frozen=True)
class PendingWait:
    """An open waitpoint of the run. An approval carries an unbound instance of its form, if it has one."""

    id: int
    kind: str
    step_key: str
    event_name: str = ""
    prompt: str = ""
    timeout_at: datetime | None = None
    form: forms.Form | None = None
    form_missing: bool = False

    @property
    def is_approval(self) -> bool:
        return self.kind == WaitpointKind.APPROVAL

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PendingWait:
        form, missing = None, False
        if data.get("kind") == WaitpointKind.APPROVAL and data.get("form"):
            try:
                form = import_string(data["form"])(prefix=approval_form_prefix(data["id"]))
            except ImportError:  # the form's code moved: approve/reject still work, without its fields
                missing = True
        return cls(
            id=data["id"],
            kind=data["kind"],
            step_key=data["step_key"],
            event_name=data.get("event_name") or "",
            prompt=data.get("prompt") or "",
            timeout_at=_parse_ts(data.get("timeout_at")),
            form=form,
            form_missing=missing,
        )


def approval_form_prefix(waitpoint_id: int) -> str:
    return f"wp{waitpoint_id}"


# Step kinds drawn as waits (hatched, with their deadline), not as work.
WAIT_KINDS = frozenset({"sleep", "event", "approval", "invoke", "map"})


@dataclass(frozen=True)
class Segment:
    """One stretch of a step on the time axis: an attempt, a wait, or the back-off before a retry. `start` and
    `end` are what static/js/dex.js re-lays the bar out from (`end` None: still going, drawn up to now)."""

    kind: str  # "attempt", "wait" or "backoff"
    status: str
    start: datetime | None
    end: datetime | None
    left: float
    width: float
    attempt: int = 0
    title: str = ""
    deadline: datetime | None = None

    @property
    def start_ms(self) -> int | str:
        return int(self.start.timestamp() * 1000) if self.start else ""

    @property
    def end_ms(self) -> int | str:
        return int(self.end.timestamp() * 1000) if self.end else ""

    @property
    def deadline_ms(self) -> int | str:
        return int(self.deadline.timestamp() * 1000) if self.deadline else ""


@dataclass(frozen=True)
class Timeline:
    """The one time axis every row of the trace is drawn against: from the run's start (or its first step's)
    to its end, or now while it goes on. Positions are percent of that span; a live page re-lays them out
    against its own clock (static/js/dex.js), so a row pushed later lines up with the rows already shown."""

    start: datetime | None
    seconds: float = 0.0
    live: bool = False

    @classmethod
    def of(cls, run: Run, steps: list[Any]) -> Timeline:
        starts = [s.started_at for s in steps if getattr(s, "started_at", None)]
        for step in steps:
            for entry in getattr(step, "history", None) or []:
                if ts := _parse_ts(entry.get("started_at")):
                    starts.append(ts)
        ends = [s.finished_at for s in steps if getattr(s, "finished_at", None)]
        start = min([*starts, run.started_at] if run.started_at else starts) if starts or run.started_at else None
        if start is None:
            return cls(None, live=not run.is_terminal)
        end = max([*ends, start]) if run.is_terminal else timezone.now()
        if run.is_terminal and run.finished_at:
            end = max(end, run.finished_at)
        return cls(start, max((end - start).total_seconds(), 0.001), live=not run.is_terminal)

    def position(self, started: datetime | None, finished: datetime | None) -> tuple[float, float]:
        """(left, width) in percent of the span; an open end is now, clipped to the axis."""
        if self.start is None or started is None:
            return 0.0, 0.0
        finished = finished or timezone.now()
        left = min(max((started - self.start).total_seconds() / self.seconds, 0.0), 1.0)
        width = max((finished - started).total_seconds(), 0.0) / self.seconds
        return round(left * 100, 2), round(max(min(width, 1.0 - left), 0.004) * 100, 2)

    def bar(self, step: Any) -> tuple[float, float] | None:
        """(left, width) in percent of the span of a step's whole extent, or None for a step not timed yet."""
        segments = self.segments(step)
        if not segments or segments[0].start is None:
            return None
        first, last = segments[0], segments[-1]
        return self.position(first.start, last.end)

    def extent(self, step: Any, live_status: str | None = None) -> tuple[datetime | None, datetime | None]:
        segments = self.segments(step, live_status=live_status)
        if not segments:
            return None, None
        return segments[0].start, segments[-1].end

    def segments(self, step: Any, *, live_status: str | None = None, live_attempt: int | None = None) -> list[Segment]:
        """The step's stretches in time order: each failed attempt (from its history), the back-off after it,
        then the last attempt, or the wait (sleep, event, approval, child runs) with its deadline."""
        status = live_status or getattr(step, "status", "running")
        kind = getattr(step, "kind", "") or "step"
        started, finished = getattr(step, "started_at", None), getattr(step, "finished_at", None)
        attempts = int(live_attempt or getattr(step, "attempts", 1) or 1)
        # The attempt that follows the recorded failures, if any: its start closes the last back-off.
        current: tuple[datetime | None, datetime | None] | None = None
        if status == "running":
            # The attempt under way has no row yet (written when it settles): it started about now.
            current = (started if started and live_status is None else timezone.now(), None)
        elif status == "completed" and kind not in WAIT_KINDS:
            current = (started, finished)
        history = list(getattr(step, "history", None) or [])
        out: list[Segment] = []
        for i, entry in enumerate(history):
            a_start, a_end = _parse_ts(entry.get("started_at")), _parse_ts(entry.get("finished_at"))
            error = entry.get("error") or {}
            number = int(entry.get("attempt") or i + 1)
            title = f"attempt {number} failed: {error.get('type', '')}: {error.get('message', '')}"
            out.append(Segment("attempt", "failed", a_start, a_end, *self.position(a_start, a_end), number, title))
            if i + 1 < len(history):
                gap_end = _parse_ts(history[i + 1].get("started_at"))
            elif current is not None:
                gap_end = current[0]
            elif status == "retrying":
                gap_end = None  # still backing off: drawn up to now, the retry's time as its deadline
            else:
                continue
            deadline = getattr(step, "wake_at", None) if gap_end is None else None
            label = f"back-off before attempt {number + 1}"
            if a_end is not None and (gap_end is None or gap_end > a_end):
                out.append(
                    Segment("backoff", "retrying", a_end, gap_end, *self.position(a_end, gap_end), 0, label, deadline)
                )
        if current is not None:
            title = f"attempt {attempts} {status}"
            out.append(Segment("attempt", status, current[0], current[1], *self.position(*current), attempts, title))
        elif kind in WAIT_KINDS and status in ("waiting", "completed"):
            deadline = getattr(step, "wake_at", None) if status == "waiting" else None
            label = _wait_label(step, kind)
            if deadline:
                label += f" until {timezone.localtime(deadline):%Y-%m-%d %H:%M:%S}"
            end = finished if status == "completed" else None
            out.append(Segment("wait", status, started, end, *self.position(started, end), 1, label, deadline))
        elif status == "failed" and not history:
            title = f"attempt {attempts} failed"
            out.append(
                Segment("attempt", "failed", started, finished, *self.position(started, finished), attempts, title)
            )
        return out

    def ticks(self, count: int = 4) -> list[tuple[float, str]]:
        """Tick marks of the axis: (percent, elapsed time label)."""
        if self.start is None:
            return [(0.0, "0 s")]
        return [(round(100 * i / count, 2), _elapsed(self.seconds * i / count)) for i in range(count + 1)]

    def extended_to_now(self) -> Timeline:
        if self.start is None:
            return self
        now = timezone.now()
        return Timeline(self.start, max(self.seconds, (now - self.start).total_seconds(), 0.001), self.live)

    @property
    def start_ms(self) -> int | str:
        return int(self.start.timestamp() * 1000) if self.start else ""

    @property
    def end_ms(self) -> int | str:
        if self.start is None or self.live:
            return ""
        return int(self.start.timestamp() * 1000 + self.seconds * 1000)


def _wait_label(step: Any, kind: str) -> str:
    meta = getattr(step, "meta", None) or {}
    if kind == "sleep":
        return "sleeping"
    if kind == "event":
        return f"waiting for event {meta.get('event', '')}".rstrip()
    if kind == "approval":
        return "waiting for approval"
    return "waiting for child run" + ("s" if kind == "map" else "")


def _elapsed(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


# --- the step inspector -----------------------------------------------------------------------------------


def step_inspector_context(
    run: Run,
    key: str,
    *,
    step: Step | None = None,
    can_operate: bool = False,
    tokens: dict[str, str] | None = None,
    logs: list[LogLine] | None = None,
    step_read: bool = False,
) -> dict[str, Any]:
    """What the inspector shows of one step: the step, its log lines, its streamed text (each read unless
    given). At most three queries."""
    if step is None and not step_read:  # step_read: the caller looked it up already (None: there is none)
        step = step_get_or_none(run.pk, key)
    if logs is None:
        logs = list(LogLine.objects.filter(run_id=run.pk, step_key=key).order_by("-id")[:LOG_LINES_LIMIT])
        logs.reverse()
    streamed = (tokens or {}).get(key)
    if streamed is None and (step is None or step.status != StepStatus.COMPLETED) and not run.is_terminal:
        streamed = streamed_text(run.pk, key)
    return {
        "key": key,
        "step": step,
        "logs": logs,
        "streamed": streamed or "",
        "can_fork": can_operate and step is not None and step.status in (StepStatus.COMPLETED, StepStatus.FAILED),
    }


def render_step_inspector(run: Run, inspector: dict[str, Any] | None, *, request: Any = None) -> str:
    """The inspector region alone (an htmx answer to a click on a step)."""
    context = {"run": run, "run_pk": run.pk, "inspector": inspector}
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#step-inspector", context, request=request)


def render_child_trace(run: Run, steps: list[Step]) -> str:
    """A child run's steps, drawn against its own axis, nested under the parent's step that started it."""
    context = {"child": run, "steps": steps, "timeline": Timeline.of(run, steps)}
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#child-trace", context)


# --- the run list -----------------------------------------------------------------------------------------


def render_run_rows(runs: list[Run], *, is_operator: bool = False) -> str:
    context = {"runs": runs, "oob": "true", "is_operator": is_operator}
    return render_to_string(f"{RUN_LIST_TEMPLATE}#run-rows", context)


def render_run_row(run: Run, *, oob: str = "true", is_operator: bool = False) -> str:
    """The row of `run`, replacing its current row (`oob="true"`) or inserted as `oob` says. An operator's
    rows carry the bulk-selection checkbox."""
    context = {"run": run, "is_operator": is_operator}
    if oob == "true":
        return render_to_string(f"{RUN_LIST_TEMPLATE}#run-row", {**context, "row_oob": "true"})
    return render_to_string(f"{RUN_LIST_TEMPLATE}#run-insert", {**context, "oob": oob})


def render_run_counters(counters: list[selectors.StatusCount]) -> str:
    return render_to_string(f"{RUN_LIST_TEMPLATE}#run-counters", {"counters": counters, "oob": "true"})


def render_remove(dom_id: str) -> str:
    if dom_id == "runs-empty":
        # The "no runs" row is never removed, only hidden once a run row is there (CSS): a later removal would
        # otherwise find no target (htmx:oobErrorNoTarget), e.g. after a bulk action re-rendered the rows.
        return ""
    return render_to_string(f"{RUN_LIST_TEMPLATE}#row-remove", {"dom_id": dom_id})


# --- the run page -----------------------------------------------------------------------------------------

# The header holds the run's actions and its pending waits (approvals), which change with its status too.
_STATUS_REGIONS = ("run-header", "run-output")
_DETAIL_REGIONS = (*_STATUS_REGIONS, "run-steps", "run-logs", "run-metadata")


def render_run_snapshot(context: dict[str, Any]) -> str:
    """Every region of the run page, each replacing its counterpart by id."""
    return "".join(
        render_to_string(f"{RUN_DETAIL_TEMPLATE}#{name}", {**context, "oob": "true"}) for name in _DETAIL_REGIONS
    )


def render_run_status(run: Run, *, can_operate: bool = False, request: Any = None) -> str:
    """The regions that change with the run's status: header (with actions and pending waits) and output.
    `run` should come from run_detail_get_or_none (its counts, children and waits)."""
    context = {"run": run, "oob": "true", "can_operate": can_operate}
    return "".join(
        render_to_string(f"{RUN_DETAIL_TEMPLATE}#{name}", context, request=request) for name in _STATUS_REGIONS
    )


def render_step(
    step: Step | PendingStep,
    *,
    oob: str,
    run_pk: UUID | str,
    live_status: str | None = None,
    live_attempt: int | None = None,
    can_operate: bool = False,
    timeline: Timeline | None = None,
) -> str:
    """One step row. `oob` is "true" (replace the row with the same id), "outerHTML:#<id>" (replace
    another row, e.g. the pending one) or "append" (add it at the end of the step list)."""
    context = {
        "step": step,
        "run_pk": run_pk,
        "live_status": live_status,
        "live_attempt": live_attempt,
        "can_operate": can_operate,
        "timeline": timeline or Timeline(None),
    }
    if oob == "append":
        return render_to_string(f"{RUN_DETAIL_TEMPLATE}#step-append", context)
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#step-row", {**context, "row_oob": oob})


def render_log_lines(lines: list[dict[str, Any]], *, run_pk: UUID | str) -> str:
    """Log lines pushed by a worker (not yet in Postgres: the engine stores them with the next write)."""
    logs = [{**line, "ts": _parse_ts(line.get("ts"))} for line in lines]
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#log-append", {"logs": logs, "run_pk": run_pk})


def render_metadata(run: Run | Any, metadata: dict[str, Any]) -> str:
    return render_to_string(
        f"{RUN_DETAIL_TEMPLATE}#run-metadata", {"run": run, "metadata": sorted(metadata.items()), "oob": "true"}
    )


def render_tokens(dom_id: str, text: str) -> str:
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#token-append", {"dom_id": dom_id, "text": text})


def render_tokens_reset(dom_id: str) -> str:
    """Empty a step's token stream: a new attempt (retry, failover) streams again from the start."""
    return render_to_string(f"{RUN_DETAIL_TEMPLATE}#token-reset", {"dom_id": dom_id})


def _parse_ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return parse_datetime(value)
    return None
