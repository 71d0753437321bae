"""Websockets of the dashboard: `/ws/runs/` (the run list) and `/ws/runs/<id>/` (one run's page).

Each consumer authorises before accepting, then gets the current snapshot: on every (re)connect the client is
repaired from Postgres (or from its process's mirror of it), because pub/sub is at-most-once. Events come
from runs.realtime's Redis channels through one subscription per process (runs.realtime.Subscriber), not
through the channel layer: a consumer has no channel-layer channel of its own.

A run page's socket joins its run's hub (runs.web.hub): one mirror, one render per event and variant, the same
frame written to every socket watching that run. The run list's sockets each place rows (their filters
differ), reading a changed run once per process per event (SharedReads) and sharing renders.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import QueryDict

from runs.models import Run
from runs.ops import audit
from runs.selectors import RunListFilters
from runs.web import fragments
from runs.web import hub as hub_module
from runs.web.run_filters import RunFilterForm

log = logging.getLogger(__name__)


def _authenticated(scope: dict[str, Any]) -> bool:
    user = scope.get("user")
    return bool(user is not None and user.is_authenticated)


# RFC 6455 close code "message too big".
CLOSE_TOO_BIG = 1009


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

    # No channel-layer channel per socket (no Redis subscription per socket): events come through the
    # process's one Subscriber. An alias that isn't configured makes channels skip the layer.
    channel_layer_alias = "dex-websockets-use-no-channel-layer"

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        if size > settings.DEX_MAX_WS_MESSAGE_BYTES:
            limit = settings.DEX_MAX_WS_MESSAGE_BYTES
            log.warning("closing a websocket that sent a %d-byte frame (limit %d)", size, limit)
            try:
                await self.close(code=CLOSE_TOO_BIG)
            except Exception as exc:  # a server that refuses the code: close anyway, without a traceback
                log.warning("the server refused close code %d (%s); closing with 1000", CLOSE_TOO_BIG, exc)
                await self.close()
            return
        await super().websocket_receive(message)


def _let_daphne_send_rfc_close_codes() -> None:
    """daphne closes a socket through autobahn's `sendClose`, which takes only 1000 and 3000-4999 from an
    application and raises on 1009, though RFC 6455 (7.4.1) has an endpoint send 1009 for a message too big to
    process: the close became a traceback and a 1011. For the RFC's own codes, daphne's `serverClose` sends
    the close frame with autobahn's `sendCloseFrame`, the frame writer `sendClose` ends in. Pinned by
    tests/integration/test_realtime.py (a real daphne), so an upgrade that moves these names fails a test."""
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # served by another ASGI server: it passes the code on itself
        return
    if getattr(WebSocketProtocol, "_dex_rfc_close_codes", False) or not hasattr(WebSocketProtocol, "sendCloseFrame"):
        return
    server_close = WebSocketProtocol.serverClose

    def serverClose(self: Any, code: int | None = None) -> None:  # noqa: N802 (daphne's name)
        if code in _RFC_CLOSE_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            server_close(self, code=code)

    WebSocketProtocol.serverClose = serverClose
    WebSocketProtocol._dex_rfc_close_codes = True


# Codes an endpoint may send (RFC 6455 7.4.1) that autobahn's sendClose refuses: policy, too big, internal.
_RFC_CLOSE_CODES = {1008, 1009, 1011}
_let_daphne_send_rfc_close_codes()


class RunListConsumer(CappedConsumer):
    """The run list's first page, filtered as the socket URL's query string says (the page's own filters):
    new runs that match appear, status changes replace their row, a run that stops matching leaves, and the
    per-status counters follow. Fed by the process's RunListHub (runs.web.hub)."""

    filters = RunListFilters()
    is_operator = False
    hub: hub_module.RunListHub | None = None

    async def connect(self) -> None:
        if not _authenticated(self.scope):
            await self.close()
            return
        self.filters = RunFilterForm(QueryDict(self.scope.get("query_string", b"").decode())).filters()
        # Pushed rows carry the bulk-selection checkbox only for operators.
        self.is_operator = await database_sync_to_async(audit.is_operator)(self.scope["user"])
        await self.accept()
        # Joined (subscribed) before the snapshot's read, so no change falls between the two.
        self.shown: list[UUID] = []
        self.hub = hub_module.run_list_hub()
        await self.hub.join(self)
        runs = await database_sync_to_async(fragments.run_list_runs)(self.filters)
        # Newest first, as on the page.
        self.shown = [run.pk for run in runs]
        await self.send(text_data=fragments.render_run_rows(runs, is_operator=self.is_operator))
        await self.hub.greet(self, runs)

    async def disconnect(self, code: int) -> None:
        if self.hub is not None:
            await self.hub.leave(self)

    def place(self, run: Run) -> list[str]:
        return self._place(run)

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


class RunDetailConsumer(CappedConsumer):
    """One run's page: header, output, steps, logs and metadata, live, through the run's hub."""

    hub: hub_module.RunHub | None = None

    async def connect(self) -> None:
        self.run_id: UUID = self.scope["url_route"]["kwargs"]["run_id"]
        if not _authenticated(self.scope):
            await self.close()
            return
        if not await database_sync_to_async(Run.objects.filter(pk=self.run_id).exists)():
            await self.close()
            return
        # Pushed headers and step rows carry the action buttons only for operators.
        can_operate = await database_sync_to_async(audit.is_operator)(self.scope["user"])
        await self.accept()
        self.hub = hub_module.run_hub(self.run_id)
        await self.hub.join(self, can_operate=can_operate)

    async def disconnect(self, code: int) -> None:
        if self.hub is not None:
            await self.hub.leave(self)
