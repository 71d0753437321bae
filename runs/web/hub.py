"""Per web process, one hub per watched run: one subscription, one mirror, one render per event.

Every socket of this process watching run X joins X's RunHub. The hub subscribes to the run's Redis channel
once (runs.realtime.Subscriber), keeps a mirror of what the run page shows (the context of
runs.web.fragments.run_detail_context, read once) and applies each event to it. For each event it renders each
changed fragment once per variant (operators see action buttons, viewers don't) and writes that same frame to
every socket watching the run. Postgres is read only for a snapshot:

- when the hub starts (its first socket); later sockets get the snapshot rendered from the mirror;
- when the event sequence has a hole (`seq` isn't the last one + 1) or the Redis connection was re-made;
- when the run ends (the end-of-run repaint, read and rendered once per process, not once per socket),
  when it parks on something the events don't describe (a waitpoint or child runs shown in its header), and
  when its status changes while a child run its header lists is unfinished (children publish on their own
  channels).

The mirror's dom ids (which row id each step has on the clients) are shared by all sockets: they all got the
same snapshot and the same frames in the same order, so one bookkeeping serves them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol
from uuid import UUID

from channels.db import database_sync_to_async
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from runs import realtime
from runs.models import TERMINAL_STATUSES, Step, StepKind
from runs.web import fragments

log = logging.getLogger(__name__)

# A run parked on these shows what it waits for (waitpoint, child runs) in its header: not in the events.
_PARKS_WITH_DETAILS = {StepKind.EVENT, StepKind.APPROVAL, StepKind.INVOKE, StepKind.MAP}


class Socket(Protocol):
    async def base_send(self, message: dict[str, Any]) -> None:
        """The ASGI send of a consumer's connection."""

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        """A websocket consumer's send."""

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        """A websocket consumer's close."""


class Stats:
    """What hubs did in this process: tests assert on them (renders and reads per event, not timings)."""

    def __init__(self) -> None:
        self.snapshot_reads = 0
        self.renders = 0
        self.frames = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


stats = Stats()


def _ts(value: Any) -> Any:
    return parse_datetime(value) if isinstance(value, str) else value


class Mirror:
    """What the clients of one run page show, as the run page's context (fragments.run_detail_context)."""

    def __init__(self, context: dict[str, Any]):
        self.context = context
        self.run = context["run"]
        self.steps: list[Any] = context["steps"]
        self.by_key: dict[str, Any] = {step.key: step for step in self.steps}
        # step key -> the id of its row on the clients
        self.step_rows: dict[str, str] = {step.key: fragments.step_dom_id(step) for step in self.steps}
        # step key -> characters of its token stream the clients show
        self.streamed: dict[str, int] = {key: len(text) for key, text in context["tokens"].items()}
        self.metadata: dict[str, Any] = dict(context["metadata"])
        self.last_step_kind = ""

    def snapshot_context(self, can_operate: bool) -> dict[str, Any]:
        self.context["timeline"] = fragments.Timeline.of(self.run, self.steps)
        self.context["metadata"] = sorted(self.metadata.items())
        return {**self.context, "can_operate": can_operate}

    def children_may_have_changed(self) -> bool:
        """The header lists the run's first children with their status, which travel on the children's own
        channels: while one of them is unfinished, a change of the parent's status re-reads them."""
        return any(child.get("status") not in TERMINAL_STATUSES for child in getattr(self.run, "children_links", []))

    # -- applying events -------------------------------------------------------------------------------------
    def apply_run(self, data: dict[str, Any]) -> None:
        run = self.run
        for name in ("status", "code_version"):
            if data.get(name) is not None:
                setattr(run, name, data[name])
        for name in ("started_at", "finished_at", "wake_at"):
            if name in data:
                setattr(run, name, _ts(data[name]))
        if "error" in data:
            run.error = data["error"]
        if "output" in data:
            run.output = data["output"]
        if data.get("cost_usd") is not None:
            with contextlib.suppress(InvalidOperation):
                run.cost_usd = Decimal(str(data["cost_usd"]))
        if data.get("cancel_requested") and not run.cancel_requested_at:
            run.cancel_requested_at = timezone.now()
        if run.status != "waiting":
            run.pending_waits = []
        if run.status not in ("waiting", "delayed"):
            run.wake_at = None
        run.version = None  # the page's version guard compares reads; a push from the mirror is newest

    def apply_step(self, data: dict[str, Any]) -> Any:
        key = data["key"]
        status = data.get("status") or "running"
        attempt = int(data.get("attempt") or 1)
        step = self.by_key.get(key)
        if not isinstance(step, Step):
            step = Step(
                run_id=self.run.pk,
                key=key,
                seq=data.get("seq") or 0,
                kind=data.get("kind") or getattr(step, "kind", "") or StepKind.STEP,
                status=status,
                attempts=attempt,
                history=[],
                meta={},
            )
            old = self.by_key.get(key)
            if old is not None and old in self.steps:
                self.steps[self.steps.index(old)] = step
            else:
                self.steps.append(step)
                if len(self.steps) > fragments.STEPS_LIMIT:
                    dropped = self.steps.pop(0)
                    self.by_key.pop(dropped.key, None)
                    self.context["hidden_steps"] = self.context.get("hidden_steps", 0) + 1
            self.by_key[key] = step
        if data.get("id") and step.pk is None:
            step.id = data["id"]
            self.run.step_count = (getattr(self.run, "step_count", 0) or 0) + 1
        self.last_step_kind = step.kind
        step.status = status
        step.attempts = attempt
        if data.get("started_at"):
            step.started_at = _ts(data["started_at"])
        step.finished_at = _ts(data.get("finished_at"))
        step.wake_at = _ts(data.get("wake_at"))
        if status == "running":
            return step
        if data.get("error"):
            error = {"type": data.get("error_type") or "Error", "message": data["error"]}
            step.error = error
            if status in ("retrying", "failed"):
                step.history = [*(step.history or []), {"attempt": attempt, "error": error}]
        elif status == "completed":
            step.error = None
        preview = data.get("output_preview")
        if preview is not None:
            try:
                step.output = json.loads(preview)
            except ValueError:
                step.output = preview  # cut: shown as text until the end-of-run repaint
        meta = dict(step.meta or {})
        if data.get("usage"):
            meta["usage"] = data["usage"]
        if data.get("children"):
            meta["children"] = data["children"]
        step.meta = meta
        return step

    def step_oob(self, step: Any) -> str:
        dom_id = fragments.step_dom_id(step)
        current = self.step_rows.get(step.key)
        self.step_rows[step.key] = dom_id
        if current is None:
            return "append"
        if current == dom_id:
            return "true"
        return f"outerHTML:#{current}"

    def apply_log(self, data: dict[str, Any]) -> None:
        line = {**data, "ts": _ts(data.get("ts"))}
        logs = self.context["logs"]
        logs.append(line)
        if len(logs) > fragments.LOG_LINES_LIMIT:
            logs.pop(0)
            self.context["hidden_logs"] = self.context.get("hidden_logs", 0) + 1
        if data.get("step_key"):
            self.context["step_logs"].setdefault(data["step_key"], []).append(line)


class RunHub:
    """The sockets of this process watching one run, fed from one subscription (see the module docstring)."""

    def __init__(self, run_id: UUID):
        self.run_id = run_id
        self.channel = realtime.run_channel(run_id)
        self.sockets: dict[Socket, bool] = {}  # socket -> can_operate
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.mirror: Mirror | None = None
        self.last_seq: int | None = None
        # The snapshot frame per variant, rendered from the mirror once until the next event changes it.
        self._snapshot_html: dict[bool, str] = {}
        # Events that came before the first snapshot was read: applied after it (the old order of things).
        self._early: list[realtime.RunEvent] = []
        self._subscribed = asyncio.Event()
        self.greeted: set[Socket] = set()
        # Fragments rendered for events not yet written (see _loop).
        self._pending: list[dict[bool | None, list[str]]] = []

    async def join(self, socket: Socket, *, can_operate: bool) -> None:
        self.sockets[socket] = can_operate
        if self.task is None:
            self.task = asyncio.ensure_future(self._loop())
            await realtime.subscriber().subscribe(self.channel, self._on_event)
            # Only now may a snapshot be read (by the loop, for this or a socket that joined meanwhile):
            # read before the subscription, it could miss an event published in between.
            self._subscribed.set()
        self.queue.put_nowait(("join", socket))

    async def leave(self, socket: Socket) -> None:
        self.sockets.pop(socket, None)
        self.greeted.discard(socket)
        if self.sockets or _hubs.get(self.run_id) is not self:
            return
        del _hubs[self.run_id]
        if self.task is not None:
            self.task.cancel()
        await realtime.subscriber().unsubscribe(self.channel, self._on_event)

    def _on_event(self, event: realtime.RunEvent | None) -> None:
        self.queue.put_nowait(("event", event))

    async def _loop(self) -> None:
        await self._subscribed.wait()
        while True:
            await self._handle(await self.queue.get())
            # What queued up while the sockets were being written to goes out together: each socket gets one
            # frame per variant holding every fragment (htmx swaps each out-of-band element of a message), so
            # a slow fan-out (many sockets) catches up instead of falling further behind. One turn of the loop
            # first lets the subscriber hand over what Redis sent in the same read (a worker publishes a step's
            # end and the next one's start together).
            await asyncio.sleep(0)
            while not self.queue.empty():
                await self._handle(self.queue.get_nowait())
            try:
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("run %s: live update failed", self.run_id)

    async def _handle(self, queued: tuple[str, Any]) -> None:
        what, item = queued
        try:
            if what == "join":
                await self._greet(item)
            elif item is None:  # the subscription was re-made: events may be lost
                await self._resnapshot()
            else:
                await self._apply(item)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run %s: live update failed", self.run_id)

    async def _read(self) -> bool:
        stats.snapshot_reads += 1
        # The run's event number before the read (we are subscribed): every later event must come, in order.
        baseline = await realtime.subscriber().current_seq(self.run_id)
        context = await database_sync_to_async(fragments.run_detail_context)(self.run_id)
        self._snapshot_html.clear()
        self.last_seq = baseline
        if context is None:  # the run was deleted
            for socket in list(self.sockets):
                await _quietly(socket.close())
            self.mirror = None
            return False
        self.mirror = Mirror(context)
        return True

    def _snapshot_for(self, can_operate: bool) -> str:
        html = self._snapshot_html.get(can_operate)
        if html is None:
            assert self.mirror is not None
            stats.renders += 1
            html = self._snapshot_html[can_operate] = fragments.render_run_snapshot(
                self.mirror.snapshot_context(can_operate)
            )
        return html

    async def _greet(self, socket: Socket) -> None:
        if socket not in self.sockets:
            return
        if self.mirror is None and not await self._read():
            return
        await self._flush()  # the others get what the mirror has and they haven't, before it moves on
        await self._write_to([socket], {self.sockets[socket]: [self._snapshot_for(self.sockets[socket])]})
        self.greeted.add(socket)
        early, self._early = self._early, []
        for event in early:
            await self._apply(event)

    async def _resnapshot(self) -> None:
        await self._flush()  # what came before the snapshot goes first
        if not await self._read():
            return
        frames = {variant: [self._snapshot_for(variant)] for variant in set(self.sockets.values())}
        await self._write_to(list(self.sockets), frames)
        self.greeted.update(self.sockets)

    async def _apply(self, event: realtime.RunEvent) -> None:
        if self.mirror is None:
            self._early.append(event)
            return
        if event.seq is not None and self.last_seq is not None and event.seq <= self.last_seq:
            # Published before the snapshot's read: its commit is in the snapshot, but what it announced without
            # a commit (a step starting, a log line, tokens) may not be: applied, the sequence left as it is.
            pass
        elif event.seq is not None:
            if self.last_seq is not None and event.seq != self.last_seq + 1:
                log.info("run %s: events %s..%s lost; reading a snapshot", self.run_id, self.last_seq, event.seq)
                await self._resnapshot()  # its baseline is at least this event's number
                if event.kind not in ("step", "token", "metadata"):
                    return
            else:
                self.last_seq = event.seq
        self._snapshot_html.clear()
        mirror = self.mirror
        data = event.data
        frames: dict[bool | None, list[str]] = {}
        if event.kind == "run":
            if (
                data.get("status") in TERMINAL_STATUSES
                # Reopened (a retry): its steps' statuses changed in Postgres without events of their own.
                or (mirror.run.status in TERMINAL_STATUSES and data.get("status") not in TERMINAL_STATUSES)
                or (data.get("status") == "waiting" and mirror.last_step_kind in _PARKS_WITH_DETAILS)
                or mirror.children_may_have_changed()
            ):
                # The run's last write stored every line and step: repaint every region from Postgres once.
                await self._resnapshot()
                return
            mirror.apply_run(data)
            for variant in set(self.sockets.values()):
                stats.renders += 1
                frames[variant] = [fragments.render_run_status(mirror.run, can_operate=variant)]
        elif event.kind == "step" and data.get("key"):
            step = mirror.apply_step(data)
            oob = mirror.step_oob(step)
            if mirror.context["timeline"].start is None:  # the run had not started at the snapshot
                mirror.context["timeline"] = fragments.Timeline.of(mirror.run, mirror.steps)
            timeline = mirror.context["timeline"].extended_to_now()
            for variant in set(self.sockets.values()):
                stats.renders += 1
                html = fragments.render_step(step, oob=oob, run_pk=self.run_id, can_operate=variant, timeline=timeline)
                frames[variant] = [html]
        elif event.kind == "log":
            mirror.apply_log(data)
            stats.renders += 1
            frames[None] = [fragments.render_log_lines([data], run_pk=self.run_id)]
        elif event.kind == "metadata" and "key" in data:
            mirror.metadata[data["key"]] = data.get("value")
            stats.renders += 1
            frames[None] = [fragments.render_metadata(mirror.run, mirror.metadata)]
        elif event.kind == "token":
            html = await self._token(data)
            if html:
                frames[None] = [html]
        if frames:
            self._pending.append(frames)

    async def _token(self, data: dict[str, Any]) -> str | None:
        assert self.mirror is not None
        mirror = self.mirror
        key = data.get("key", "")
        dom_id = mirror.step_rows.get(key)
        if not dom_id:
            return None
        tokens: dict[str, str] = mirror.context["tokens"]
        if data.get("reset"):
            mirror.streamed[key] = 0
            tokens[key] = ""
            stats.renders += 1
            return fragments.render_tokens_reset(dom_id)
        text = data.get("text") or ""
        offset = data.get("offset")
        shown = mirror.streamed.get(key, 0)
        if not text:
            return None
        if not isinstance(offset, int):  # a worker of an older version: append as it comes
            offset = shown
        end = offset + len(text)
        if end <= shown:
            return None  # the snapshot already had it (stored between subscribing and reading)
        if offset > shown:
            # Published before the hub subscribed, stored after its snapshot's read: read it back. If it isn't
            # stored yet, wait for the next piece (the final repaint shows the whole text in any case).
            stats.snapshot_reads += 1
            stored = await database_sync_to_async(fragments.streamed_text)(self.run_id, key)
            if len(stored) < offset:
                return None
            text = stored[shown:offset] + text
            offset = shown
        new = text[shown - offset :]
        mirror.streamed[key] = end
        tokens[key] = tokens.get(key, "") + new
        stats.renders += 1
        return fragments.render_tokens(dom_id, new)

    async def _flush(self) -> None:
        """Write the fragments of the events applied since the last write: one frame per variant."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        joined: dict[Any, list[str]] = {}
        for variant in set(self.sockets.values()):
            joined[variant] = [
                "".join(html for frames in pending for html in frames.get(variant, frames.get(None, [])))
            ]
        await self._write_to(list(self.sockets), joined)

    async def _write_to(self, sockets: list[Socket], frames: dict[Any, list[str]]) -> None:
        # One ASGI message per frame, handed to every socket's server-side send as it is (the consumer's own
        # send() only wraps text in this same message, a few coroutine layers per socket per frame).
        messages = {
            variant: [{"type": "websocket.send", "text": html} for html in htmls] for variant, htmls in frames.items()
        }
        shared = messages.get(None, [])
        for socket in sockets:
            variant = self.sockets.get(socket)
            if variant is None:
                continue
            for message in messages.get(variant, shared):
                stats.frames += 1
                try:
                    await socket.base_send(message)
                except Exception:  # a socket that went away mid-write: its disconnect removes it from the hub
                    log.debug("a live update could not be written", exc_info=True)


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:  # a socket that went away mid-write: its disconnect removes it from the hub
        log.debug("a live update could not be written", exc_info=True)


# run id -> its hub, in this process (one event loop: daphne's).
_hubs: dict[UUID, RunHub] = {}


def run_hub(run_id: UUID) -> RunHub:
    hub = _hubs.get(run_id)
    if hub is None or hub.task is not None and hub.task.get_loop() is not asyncio.get_running_loop():
        hub = _hubs[run_id] = RunHub(run_id)
    return hub


class ListSocket(Protocol):
    is_operator: bool

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        """A websocket consumer's send."""

    def place(self, run: Any) -> list[str]:
        """The frames that put `run` on this socket's list (its filters, its rows)."""


class RunListHub:
    """The run-list sockets of this process, fed from one subscription to the runs channel.

    Each socket has its own filters and rows, so placing a run is per socket; what is shared is the
    subscription, the run as of the event (a mirror of the runs the sockets show, updated from the events
    the worker publishes, which carry everything a row shows; a run not in the mirror, or an event from
    elsewhere that says only the status, is read once per process), the rendering of its row (once per
    variant, runs.web.consumers._rendered) and the per-status counters (read and rendered once per
    interval for every socket).
    """

    # The counters cost a (bounded) query: refreshed at most this often, however many runs change.
    COUNTERS_INTERVAL = 2.0
    # Fields a worker's run event carries (runs.engine.settle.run_event, execute): enough for a row.
    _COMPLETE = ("started_at", "code_version")
    # Runs kept in the mirror: a few pages' worth (a socket shows fragments.RUN_LIST_LIMIT).
    MIRROR_LIMIT = 2000

    def __init__(self) -> None:
        self.channel = realtime.runs_channel()
        self.sockets: set[ListSocket] = set()
        self.queue: asyncio.Queue[realtime.RunEvent | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.runs: dict[str, Any] = {}  # run id -> Run, as the last event left it
        self.seqs: dict[str, int] = {}
        self._counters_html: str | None = None
        self._counters_task: asyncio.Task[None] | None = None
        self._counters_read = 0.0
        self._subscribed = asyncio.Event()

    async def join(self, socket: ListSocket) -> None:
        """Returns once the hub is subscribed: the socket's snapshot is to be read after that."""
        self.sockets.add(socket)
        if self.task is None:
            self.task = asyncio.ensure_future(self._loop())
            await realtime.subscriber().subscribe(self.channel, self.queue.put_nowait)
            self._subscribed.set()
        await self._subscribed.wait()

    async def greet(self, socket: ListSocket, runs: list[Any]) -> None:
        """After the socket's snapshot (`runs`, read on connect, which join the mirror): the counters."""
        for run in runs:
            self.runs.setdefault(str(run.pk), run)
        if self._counters_html is None:
            await self._read_counters()
        await _quietly(socket.send(text_data=self._counters_html))

    async def leave(self, socket: ListSocket) -> None:
        self.sockets.discard(socket)
        if self.sockets or _list_hubs.get(asyncio.get_running_loop()) is not self:
            return
        del _list_hubs[asyncio.get_running_loop()]
        for task in (self.task, self._counters_task):
            if task is not None:
                task.cancel()
        await realtime.subscriber().unsubscribe(self.channel, self.queue.put_nowait)

    async def _loop(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await self._apply(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("run list: live update failed")

    async def _apply(self, event: realtime.RunEvent | None) -> None:
        if event is None:  # events were lost: forget the mirror, re-read the counters
            self.runs.clear()
            self.seqs.clear()
            self._counters_soon()
            return
        if event.kind != "run":
            return
        run = await self._run_as_of(event)
        if run is None:  # deleted, or another database's run on a shared Redis
            return
        run.__dict__.pop("_dex_rendered", None)  # rendered for the previous event
        for socket in list(self.sockets):
            for html in socket.place(run):
                stats.frames += 1
                await _quietly(socket.send(text_data=html))
        self._counters_soon()

    async def _run_as_of(self, event: realtime.RunEvent) -> Any:
        run = self.runs.get(event.run_id)
        last = self.seqs.get(event.run_id)
        self.seqs[event.run_id] = event.seq or 0
        # The runs channel carries a run's run-level events only, so its numbers skip the step events: order
        # is what can be checked (an older event than the mirror's is stale).
        complete = all(name in event.data for name in self._COMPLETE)
        if run is None or not complete or (last is not None and event.seq is not None and event.seq < last):
            stats.snapshot_reads += 1
            run = await shared_read(fragments.run_get_or_none, event.run_id)
            if run is None:
                self.runs.pop(event.run_id, None)
                return None
            self.runs[event.run_id] = run
            while len(self.runs) > self.MIRROR_LIMIT:  # the oldest-read runs first
                self.runs.pop(next(iter(self.runs)))
            return run
        data = event.data
        run.status = data.get("status", run.status)
        run.status_reason = ""  # a worker's event: the claim cleared it
        for name in ("started_at", "finished_at"):
            if name in data:
                setattr(run, name, _ts(data[name]))
        if data.get("cost_usd") is not None:
            with contextlib.suppress(InvalidOperation):
                run.cost_usd = Decimal(str(data["cost_usd"]))
        return run

    def _counters_soon(self) -> None:
        if self._counters_task is not None and not self._counters_task.done():
            return  # already due: it will read the counts after this change too
        delay = max(0.0, self._counters_read + self.COUNTERS_INTERVAL - asyncio.get_running_loop().time())
        self._counters_task = asyncio.ensure_future(self._send_counters(delay))

    async def _read_counters(self) -> None:
        stats.snapshot_reads += 1
        counters = await database_sync_to_async(fragments.run_list_counters)()
        self._counters_read = asyncio.get_running_loop().time()
        stats.renders += 1
        self._counters_html = fragments.render_run_counters(counters)

    async def _send_counters(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._read_counters()
        for socket in list(self.sockets):
            stats.frames += 1
            await _quietly(socket.send(text_data=self._counters_html))


_list_hubs: dict[asyncio.AbstractEventLoop, RunListHub] = {}


def run_list_hub() -> RunListHub:
    loop = asyncio.get_running_loop()
    hub = _list_hubs.get(loop)
    if hub is None:
        hub = _list_hubs[loop] = RunListHub()
    return hub


class SharedReads:
    """Single-flight reads for this process: every socket asking for (what, *args) while the same read is in
    flight awaits that read's result instead of running its own on channels' one database thread. Nothing
    is kept after the read returns, so a later event always reads afresh."""

    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    async def get(self, fn: Any, *args: Any) -> Any:
        key = (fn, *args)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(database_sync_to_async(fn)(*args))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        # shield: one socket going away mid-read must not cancel the read the others are waiting on.
        return await asyncio.shield(future)

    def _forget(self, key: tuple[Any, ...], done: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]


_shared_reads = SharedReads()


async def shared_read(fn: Any, *args: Any) -> Any:
    return await _shared_reads.get(fn, *args)
