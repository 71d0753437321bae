"""Websockets of the dashboard: `/ws/runs/` (group `runs`) and `/ws/runs/<id>/` (group `run.<id>`).

Each consumer authorises before accepting, joins its group *before* accepting (so no event between the
snapshot's read and the join is missed), then sends the current snapshot: on every (re)connect the client is
repaired from Postgres, because the channel layer is at-most-once. After that each `run.event` (a small
runs.realtime.RunEvent) is turned into HTML fragments with `hx-swap-oob`, rendered from the database with the
same partials as the pages (runs.web.fragments).

A consumer remembers which rows its client shows (which run rows, which step rows and under which id), so it
knows whether a fragment replaces a row or adds one. That mirror is exact because the client applies every
message in order and a reconnect starts a new consumer with a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import QueryDict

from runs import realtime
from runs.models import TERMINAL_STATUSES, Run, Step
from runs.ops import audit
from runs.selectors import RunListFilters
from runs.web import fragments
from runs.web.run_filters import RunFilterForm

log = logging.getLogger(__name__)


def _authenticated(scope: dict[str, Any]) -> bool:
    user = scope.get("user")
    return bool(user is not None and user.is_authenticated)


# RFC 6455 close code "message too big".
CLOSE_TOO_BIG = 1009


class SharedReads:
    """Single-flight reads for the consumers of one process.

    Every consumer of a group receives the same event at the same moment, and each would run the same query
    on channels' one database thread, one after another: with 100 watchers of a run, a step's push waited for
    99 other identical reads. The first consumer to ask for (what, *args) runs the read; the others asking
    while it is in flight await its result. Nothing is kept after the read returns, so a later event always
    reads afresh (never an older state than the event announced).
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    async def get(self, fn: Any, *args: Any) -> Any:
        key = (fn, *args)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(database_sync_to_async(fn)(*args))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        # shield: one consumer disconnecting mid-read must not cancel the read the others are waiting on.
        return await asyncio.shield(future)

    def _forget(self, key: tuple[Any, ...], done: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]


shared_reads = SharedReads()


def _rendered(obj: Any, key: tuple[Any, ...], render: Any) -> str:
    """`render()`, memoised on the (shared, read-once) model instance `obj` under `key`: the watchers that got
    the same read and need the same fragment (same oob target, same permissions) share one rendering."""
    cache = obj.__dict__.setdefault("_dex_rendered", {})
    if key not in cache:
        cache[key] = render()
    return cache[key]


class CappedConsumer(AsyncWebsocketConsumer):
    """Inbound frames over settings.DEX_MAX_WS_MESSAGE_BYTES close the socket (1009) unread: the dashboard
    sends nothing big, so a big frame is abuse (daphne's own cap, 1 MiB by default, is far looser)."""

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        if size > settings.DEX_MAX_WS_MESSAGE_BYTES:
            limit = settings.DEX_MAX_WS_MESSAGE_BYTES
            log.warning("closing a websocket that sent a %d-byte frame (limit %d)", size, limit)
            await self.close(code=CLOSE_TOO_BIG)
            return
        await super().websocket_receive(message)


class RunListConsumer(CappedConsumer):
    """The run list's first page, filtered as the socket URL's query string says (the page's own filters):
    new runs that match appear, status changes replace their row, a run that stops matching leaves, and the
    per-status counters follow."""

    # The counters cost a (bounded) query: refreshed at most this often, however many runs change.
    COUNTERS_INTERVAL = 2.0

    filters = RunListFilters()
    is_operator = False
    _counters_task: asyncio.Task[None] | None = None
    _counters_sent = 0.0

    async def connect(self) -> None:
        if not _authenticated(self.scope):
            await self.close()
            return
        self.filters = RunFilterForm(QueryDict(self.scope.get("query_string", b"").decode())).filters()
        # Pushed rows carry the bulk-selection checkbox only for operators.
        self.is_operator = await database_sync_to_async(audit.is_operator)(self.scope["user"])
        await self.channel_layer.group_add(realtime.RUNS_GROUP, self.channel_name)
        await self.accept()
        runs = await database_sync_to_async(fragments.run_list_runs)(self.filters)
        # Newest first, as on the page.
        self.shown: list[UUID] = [run.pk for run in runs]
        await self.send(text_data=fragments.render_run_rows(runs, is_operator=self.is_operator))
        await self._send_counters()

    async def disconnect(self, code: int) -> None:
        if self._counters_task is not None:
            self._counters_task.cancel()
        await self.channel_layer.group_discard(realtime.RUNS_GROUP, self.channel_name)

    async def run_event(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if event["kind"] != "run":
            return
        run = await shared_reads.get(fragments.run_get_or_none, event["run_id"])
        if run is None:  # deleted, or another database's run on a shared Redis
            return
        for html in self._place(run):
            await self.send(text_data=html)
        self._counters_soon()

    def _place(self, run: Run) -> list[str]:
        """The fragments that put `run` on the list: each is its own message, because table parts don't
        parse side by side (a bare <tr> followed by a <tbody> drops the <tbody>)."""
        if not self.filters.matches(run):
            if run.pk in self.shown:  # e.g. a "failed" filter and the run was retried
                self.shown.remove(run.pk)
                return [fragments.render_remove(f"run-{run.pk}")]
            return []
        if run.pk in self.shown:
            row = _rendered(
                run, ("row", self.is_operator), lambda: fragments.render_run_row(run, is_operator=self.is_operator)
            )
            return [row]
        if len(self.shown) >= fragments.RUN_LIST_LIMIT and run.pk < self.shown[-1]:
            return []  # older than every run shown: not on this page
        older = [pk for pk in self.shown if pk < run.pk]
        messages = []
        if not self.shown:
            messages.append(fragments.render_remove("runs-empty"))
        if older:
            # Ids are time-ordered (uuid7): the row goes just above the newest run older than it.
            oob = f"beforebegin:#run-{older[0]}"
            self.shown.insert(self.shown.index(older[0]), run.pk)
        else:
            oob = "beforeend:#run-rows"
            self.shown.append(run.pk)
        messages.append(fragments.render_run_row(run, oob=oob, is_operator=self.is_operator))
        while len(self.shown) > fragments.RUN_LIST_LIMIT:
            messages.append(fragments.render_remove(f"run-{self.shown.pop()}"))
        return messages

    def _counters_soon(self) -> None:
        if self._counters_task is not None and not self._counters_task.done():
            return  # already due: it will read the counts after this change too
        delay = max(0.0, self._counters_sent + self.COUNTERS_INTERVAL - asyncio.get_running_loop().time())
        self._counters_task = asyncio.ensure_future(self._send_counters(delay))

    async def _send_counters(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        counters = await database_sync_to_async(fragments.run_list_counters)()
        self._counters_sent = asyncio.get_running_loop().time()
        await self.send(text_data=fragments.render_run_counters(counters))


class RunDetailConsumer(CappedConsumer):
    """One run's page: header, output, steps, logs and metadata, live."""

    async def connect(self) -> None:
        self.run_id: UUID = self.scope["url_route"]["kwargs"]["run_id"]
        self.group = realtime.run_group(self.run_id)
        if not _authenticated(self.scope):
            await self.close()
            return
        if not await database_sync_to_async(Run.objects.filter(pk=self.run_id).exists)():
            await self.close()
            return
        # Pushed headers and step rows carry the action buttons only for operators.
        self.can_operate = await database_sync_to_async(audit.is_operator)(self.scope["user"])
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._send_snapshot()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def _send_snapshot(self) -> bool:
        context = await database_sync_to_async(fragments.run_detail_context)(self.run_id, can_operate=self.can_operate)
        if context is None:  # the run was deleted
            await self.close()
            return False
        self.run: Run = context["run"]
        self.timeline: fragments.Timeline = context["timeline"]
        self.metadata: dict[str, Any] = dict(context["metadata"])
        # step key -> the id of its row on the client
        self.step_rows: dict[str, str] = {step.key: fragments.step_dom_id(step) for step in context["steps"]}
        # step key -> characters of its token stream the client shows (the snapshot's stored text, then pushes)
        self.streamed: dict[str, int] = {key: len(text) for key, text in context["tokens"].items()}
        await self.send(text_data=fragments.render_run_snapshot(context))
        return True

    async def run_event(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if event["run_id"] != str(self.run_id):
            return
        kind, data = event["kind"], event.get("data") or {}
        if kind == "run":
            await self._on_run(data)
        elif kind == "step":
            await self._on_step(data)
        elif kind == "log":
            await self.send(text_data=fragments.render_log_lines([data], run_pk=self.run_id))
        elif kind == "metadata":
            # Metadata is stored with the worker's next write; the event carries the new value now.
            self.metadata[data["key"]] = data.get("value")
            await self.send(text_data=fragments.render_metadata(self.run, self.metadata))
        elif kind == "token":
            await self._on_token(data)

    async def _on_run(self, data: dict[str, Any]) -> None:
        if data.get("status") in TERMINAL_STATUSES:
            # The run's last write stored every log line and step; repaint all regions from Postgres, which
            # also repairs anything a lost event left out.
            await self._send_snapshot()
            return
        run = await shared_reads.get(fragments.run_detail_get_or_none, self.run_id)
        if run is not None:
            self.run = run
            html = _rendered(
                run,
                ("status", self.can_operate),
                lambda: fragments.render_run_status(run, can_operate=self.can_operate),
            )
            await self.send(text_data=html)

    async def _on_token(self, data: dict[str, Any]) -> None:
        key = data.get("key", "")
        dom_id = self.step_rows.get(key)
        if not dom_id:
            return
        if data.get("reset"):
            self.streamed[key] = 0
            await self.send(text_data=fragments.render_tokens_reset(dom_id))
            return
        text = data.get("text") or ""
        offset = data.get("offset")
        shown = self.streamed.get(key, 0)
        if not text:
            return
        if not isinstance(offset, int):  # a worker of an older version: append as it comes
            await self.send(text_data=fragments.render_tokens(dom_id, text))
            return
        end = offset + len(text)
        if end <= shown:
            return  # the snapshot already had it (stored between joining the group and reading)
        if offset > shown:
            # Published before this socket joined, stored after the snapshot's read: read it back. If it
            # isn't stored yet, wait for the next piece (the worker stores every 0.25 s; the final repaint
            # when the step settles shows the whole text in any case).
            stored = await shared_reads.get(fragments.streamed_text, self.run_id, key)
            if len(stored) < offset:
                return
            text = stored[shown:offset] + text
            offset = shown
        self.streamed[key] = end
        await self.send(text_data=fragments.render_tokens(dom_id, text[shown - offset :]))

    async def _on_step(self, data: dict[str, Any]) -> None:
        key = data.get("key")
        if not key:
            return
        step = await shared_reads.get(fragments.step_get_or_none, self.run_id, key)
        attempt = int(data.get("attempt") or 1)
        if data.get("status") == "running" and (step is None or step.attempts < attempt):
            # A new attempt started; its row is written when it settles.
            shown = step or fragments.PendingStep(key=key, attempts=attempt)
            await self.send(text_data=self._step_html(shown, live_status="running", live_attempt=attempt))
        elif step is not None:
            await self.send(text_data=self._step_html(step))

    def _step_html(self, step: Step | fragments.PendingStep, **live: Any) -> str:
        dom_id = fragments.step_dom_id(step)
        current = self.step_rows.get(step.key)
        if current is None:
            oob = "append"
        elif current == dom_id:
            oob = "true"
        else:
            oob = f"outerHTML:#{current}"
        self.step_rows[step.key] = dom_id

        def render() -> str:
            return fragments.render_step(
                step,
                oob=oob,
                run_pk=self.run_id,
                can_operate=self.can_operate,
                timeline=self.timeline.extended_to_now(),
                **live,
            )

        if not isinstance(step, Step):
            return render()  # a pending row, made for this consumer alone
        # Watchers of the same run share its timeline's start; the bar's width is drawn against "now" by
        # whichever renders first, within the same event.
        return _rendered(
            step, ("step", oob, self.can_operate, self.timeline.start, tuple(sorted(live.items()))), render
        )
