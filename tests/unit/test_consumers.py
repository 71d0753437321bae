"""The realtime plumbing in-process, against the real Redis channel layer (as configured): the dashboard's
websockets through the whole ASGI stack (origin check, session auth, routing, consumers) with
WebsocketCommunicator, and the SSE stream through Django's async test client.

Events are published the way the engine publishes them, through runs.realtime. The tests run their
coroutines with async_to_sync, so the consumers' database_sync_to_async calls come back to this thread and
its test-database connection. Other test sessions may share this Redis: every wait filters for this test's
own run and stops at a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import AsyncClient, Client
from django.utils import timezone

from dexweb.asgi import application
from runs import realtime
from runs.api import sse
from runs.models import ApiKey, Run, RunStatus, Step, StepChunk, StepStatus
from runs.web import fragments, hub
from runs.web.consumers import RunListConsumer

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1")


@pytest.fixture
def cookie() -> str:
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def socket(path: str, *, cookie: str | None = None, origin: bytes = ORIGIN[1]) -> WebsocketCommunicator:
    headers = [(b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def receive_until(comm: WebsocketCommunicator, predicate: Callable[[str], bool], timeout: float = 10) -> str:
    """The first message that satisfies `predicate` (others may come from other runs on a shared Redis)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for a matching websocket message")
        message = await comm.receive_from(timeout=left)
        if predicate(message):
            return message


async def receive_all_until(
    comm: WebsocketCommunicator, predicate: Callable[[str], bool], timeout: float = 10
) -> list[str]:
    """Every message up to and including the first that satisfies `predicate`."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while not messages or not predicate(messages[-1]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for a matching websocket message")
        messages.append(await comm.receive_from(timeout=left))
    return messages


def make_run(status: str = RunStatus.RUNNING, **fields: Any) -> Run:
    return Run.objects.create(task_id="t-ten-steps", status=status, payload={"ledger": "/tmp/x"}, **fields)


def make_step(run: Run, key: str, seq: int, **fields: Any) -> Step:
    now = timezone.now()
    return Step.objects.create(
        run=run,
        key=key,
        seq=seq,
        status=fields.pop("status", StepStatus.COMPLETED),
        output=fields.pop("output", seq),
        started_at=now,
        finished_at=now,
        **fields,
    )


# --- websockets: who may connect ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/runs/", "/ws/runs/{run}/"])
def test_it_refuses_an_anonymous_socket(path: str) -> None:
    run = make_run()

    async def scenario() -> None:
        comm = socket(path.format(run=run.pk))
        connected, _ = await comm.connect()
        assert not connected
        await comm.disconnect()

    async_to_sync(scenario)()


def test_it_refuses_a_socket_for_an_unknown_run(cookie: str) -> None:
    async def scenario() -> None:
        comm = socket(f"/ws/runs/{uuid.uuid4()}/", cookie=cookie)
        connected, _ = await comm.connect()
        assert not connected
        await comm.disconnect()

    async_to_sync(scenario)()


def test_it_refuses_a_socket_from_another_site(cookie: str) -> None:
    async def scenario() -> None:
        comm = socket("/ws/runs/", cookie=cookie, origin=b"https://evil.example")
        connected, _ = await comm.connect()
        assert not connected
        await comm.disconnect()

    async_to_sync(scenario)()


# --- websockets: the run page ------------------------------------------------------------------------------


def test_it_sends_the_run_page_snapshot_then_each_change(cookie: str) -> None:
    run = make_run(metadata={"phase": "start"})
    s1 = make_step(run, "s1", 0)
    pending_id = fragments.step_dom_id(fragments.PendingStep(key="s2"))

    def publish(kind: str, **data: Any) -> None:
        realtime.publish_now(realtime.RunEvent(kind, str(run.pk), data))

    async def scenario() -> None:
        comm = socket(f"/ws/runs/{run.pk}/", cookie=cookie)
        connected, _ = await comm.connect()
        assert connected
        try:
            snapshot = await comm.receive_from(timeout=10)
            for region in ("header", "output", "steps", "logs", "metadata"):
                assert f'id="run-{run.pk}-{region}"' in snapshot
            assert f'id="step-{s1.pk}"' in snapshot
            assert snapshot.count('hx-swap-oob="true"') == 5

            # A step starts: it has no row yet, so a placeholder is appended to the step list.
            publish("step", key="s2", status="running", attempt=1)
            html = await receive_until(comm, lambda m: pending_id in m)
            assert f'hx-swap-oob="beforeend:#run-{run.pk}-steps"' in html
            assert "status-running" in html

            # It settles: its row replaces the placeholder. The event says what changed, the row's id included
            # (as the engine's do); nothing is read back.
            s2 = await _create_step(run, "s2", 1)
            publish("step", key="s2", id=s2.pk, seq=1, status="completed", attempt=1, output_preview="1")
            html = await receive_until(comm, lambda m: f'id="step-{s2.pk}"' in m)
            assert f'hx-swap-oob="outerHTML:#{pending_id}"' in html
            assert "status-completed" in html

            # A log line (not yet in Postgres) is appended, escaped.
            publish("log", step_key="s2", ts=timezone.now().isoformat(), level="INFO", message="<b>hi</b>")
            html = await receive_until(comm, lambda m: "log-lines" in m)
            assert f'hx-swap-oob="beforeend:#run-{run.pk}-log-lines"' in html
            assert "&lt;b&gt;hi&lt;/b&gt;" in html and "<b>hi</b>" not in html

            # Metadata: the panel shows the stored values with the new one.
            publish("metadata", key="progress", value=0.5)
            html = await receive_until(comm, lambda m: f'id="run-{run.pk}-metadata"' in m)
            assert "progress" in html and "0.5" in html and "phase" in html

            # The run finishes: every region is repainted from Postgres.
            await _finish(run)
            publish("run", status="completed")
            html = await receive_until(comm, lambda m: f'id="run-{run.pk}-header"' in m)
            assert "status-completed" in html
            assert f'id="step-{s1.pk}"' in html and f'id="step-{s2.pk}"' in html and pending_id not in html
            assert "55" in html  # the output
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()


def test_it_shows_a_retry_attempt_running_on_the_existing_row(cookie: str) -> None:
    run = make_run()
    failed = make_step(
        run,
        "flaky",
        0,
        status=StepStatus.RETRYING,
        output=None,
        error={"type": "ConnectionError", "message": "boom", "traceback": "Traceback: boom"},
        history=[
            {"attempt": 1, "error": {"type": "ConnectionError", "message": "boom", "traceback": "Traceback: boom"}}
        ],
    )

    async def scenario() -> None:
        comm = socket(f"/ws/runs/{run.pk}/", cookie=cookie)
        connected, _ = await comm.connect()
        assert connected
        try:
            snapshot = await comm.receive_from(timeout=10)
            assert "ConnectionError: boom" in snapshot  # the failed attempt's segment (tracebacks: the inspector)
            realtime.publish_now(
                realtime.RunEvent("step", str(run.pk), {"key": "flaky", "status": "running", "attempt": 2})
            )
            html = await receive_until(comm, lambda m: f'id="step-{failed.pk}"' in m)
            assert 'hx-swap-oob="true"' in html
            assert "status-running" in html and "attempt 2" in html
            assert "attempt 1 failed: ConnectionError: boom" in html  # the earlier attempt stays visible
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()


def test_a_page_opened_mid_stream_shows_each_streamed_character_once(cookie: str) -> None:
    run = make_run()
    StepChunk.objects.create(run=run, step_key="answer", attempt=1, seq=0, text="Hello ")
    tokens_id = fragments.step_dom_id(fragments.PendingStep(key="answer")) + "-tokens"

    def piece(offset: int, text: str) -> None:
        data = {"key": "answer", "attempt": 1, "offset": offset, "text": text}
        realtime.publish_now(realtime.RunEvent("token", str(run.pk), data))

    async def scenario() -> None:
        comm = socket(f"/ws/runs/{run.pk}/", cookie=cookie)
        connected, _ = await comm.connect()
        assert connected
        try:
            snapshot = await comm.receive_from(timeout=10)
            assert f'id="{tokens_id}"' in snapshot and "Hello " in snapshot

            # Published after this socket joined but stored before its snapshot read it: not shown twice.
            piece(0, "Hello ")
            piece(6, "wor")
            html = await receive_until(comm, lambda m: tokens_id in m)
            assert ">wor<" in html

            # Published before this socket joined, stored since: read back and shown before the new piece.
            await _sync(lambda: StepChunk.objects.create(run=run, step_key="answer", attempt=1, seq=1, text="world"))
            piece(11, ", hi")
            html = await receive_until(comm, lambda m: tokens_id in m)
            assert ">ld, hi<" in html

            # A gap not stored yet waits for a later piece; nothing is shown out of order.
            piece(30, "later")
            piece(15, "!")
            html = await receive_until(comm, lambda m: tokens_id in m)
            assert ">!<" in html and "later" not in html
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()


def test_sockets_watching_one_run_cost_one_snapshot_and_one_render_per_event_not_one_per_socket(
    cookie: str, operator: Client
) -> None:
    """N sockets of one process on one run: the run is read once when the first one joins; after that an event
    costs no query and one render per variant (viewer, operator), written to all N. A hole in the event
    sequence, and the run's end, cost one read for all of them."""
    run = make_run(metadata={"phase": "start"})
    make_step(run, "s1", 0)
    operator_cookie = f"sessionid={operator.cookies['sessionid'].value}"
    cookies = [cookie, operator_cookie] * 6  # 12 sockets, two variants
    # Every query of the consumers runs on this thread's connection (database_sync_to_async comes back here).
    queries: list[str] = []

    def counted(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        queries.append(sql)
        return execute(sql, params, many, context)

    one_snapshot: list[str] = []

    def publish(kind: str, **data: Any) -> None:
        realtime.publish_now(realtime.RunEvent(kind, str(run.pk), data), to_runs_list=kind == "run")

    async def each_gets(comms: list[WebsocketCommunicator], predicate: Callable[[str], bool]) -> list[str]:
        return [await receive_until(comm, predicate) for comm in comms]

    async def scenario() -> None:
        hub.stats.reset()
        comms = [socket(f"/ws/runs/{run.pk}/", cookie=c) for c in cookies]
        try:
            for comm in comms:
                connected, _ = await comm.connect()
                assert connected
            snapshots = await each_gets(comms, lambda m: f'id="run-{run.pk}-steps"' in m)
            assert all("s1" in m for m in snapshots)
            assert hub.stats.snapshot_reads == 1  # the first socket's; the others were served from the mirror

            s2 = await _create_step(run, "s2", 1)
            hub.stats.reset()
            queries.clear()
            publish("step", key="s2", seq=1, status="running", attempt=1, started_at=timezone.now().isoformat())
            publish("step", key="s2", id=s2.pk, seq=1, status="completed", attempt=1, output_preview="1")
            publish("log", step_key="s2", ts=timezone.now().isoformat(), level="INFO", message="half way")
            publish("metadata", key="progress", value=0.5)
            publish("run", status="running", cost_usd="0.25")
            # Events that queue up while the hub writes go out together, one frame per socket: read until the
            # last event's fragment has come, then look at everything received.
            received = [
                "".join(await receive_all_until(comm, lambda m: f'id="run-{run.pk}-header"' in m)) for comm in comms
            ]
            for text in received:
                assert f'id="step-{s2.pk}"' in text and "status-completed" in text
                assert "half way" in text
                assert f'id="run-{run.pk}-metadata"' in text and "progress" in text
            assert queries == []
            # step running, step completed, run: per variant; log and metadata: the same fragment for both
            assert hub.stats.renders == 3 * 2 + 2
            assert len(comms) <= hub.stats.frames <= 5 * len(comms)
            pushed = received
            assert hub.stats.snapshot_reads == 0
            assert all(("/cancel/" in m) == (i % 2 == 1) for i, m in enumerate(pushed))  # operators' buttons

            # An event lost on the way (the run's counter moved past it): one read, a fresh snapshot for all.
            await sync_to_async(_skip_an_event)(run)
            hub.stats.reset()
            queries.clear()
            publish("metadata", key="progress", value=0.75)
            await each_gets(comms, lambda m: f'id="run-{run.pk}-steps"' in m)
            assert hub.stats.snapshot_reads == 1
            assert 0 < len(queries) <= len(one_snapshot)  # one snapshot's, whatever the number of sockets

            # The run ends: every region repainted from Postgres, read once for all the sockets.
            await _finish(run)
            hub.stats.reset()
            queries.clear()
            publish("run", status="completed")
            repaints = await each_gets(comms, lambda m: f'id="run-{run.pk}-header"' in m)
            assert all("status-completed" in m and "55" in m for m in repaints)
            assert hub.stats.snapshot_reads == 1
            assert 0 < len(queries) <= len(one_snapshot)  # one snapshot's, whatever the number of sockets
        finally:
            for comm in comms:
                await comm.disconnect()

    with connection.execute_wrapper(counted):
        fragments.run_detail_context(run.pk)
        one_snapshot += queries
        async_to_sync(scenario)()


def test_a_lost_redis_connection_is_re_made_and_every_socket_repaired_from_one_snapshot(cookie: str) -> None:
    run = make_run()
    make_step(run, "s1", 0)

    async def scenario() -> None:
        comms = [socket(f"/ws/runs/{run.pk}/", cookie=cookie) for _ in range(3)]
        try:
            for comm in comms:
                connected, _ = await comm.connect()
                assert connected
                await receive_until(comm, lambda m: f'id="run-{run.pk}-steps"' in m)
            hub.stats.reset()
            # Redis drops the process's pub/sub connection (a restart, a network blip): events meanwhile are gone.
            await sync_to_async(_kill_pubsub_connections)()
            for comm in comms:
                await receive_until(comm, lambda m: f'id="run-{run.pk}-steps"' in m)  # a fresh snapshot
            assert hub.stats.snapshot_reads == 1
            # ...and the channel was subscribed again: events flow as before.
            realtime.publish_now(realtime.RunEvent("metadata", str(run.pk), {"key": "after", "value": 1}))
            for comm in comms:
                await receive_until(comm, lambda m: "after" in m)
        finally:
            for comm in comms:
                await comm.disconnect()

    async_to_sync(scenario)()


def test_a_retried_run_is_read_again_once_for_its_watchers(cookie: str) -> None:
    """A retry reopens a failed run and resets its failed steps in Postgres, which no step event describes:
    the hub re-reads the run (once for all its sockets) when a finished run becomes live again."""
    run = make_run(status=RunStatus.FAILED, error={"type": "ValueError", "message": "first try broke"})
    make_step(run, "s1", 0, status=StepStatus.FAILED, output=None, error={"type": "ValueError", "message": "x"})

    async def scenario() -> None:
        comms = [socket(f"/ws/runs/{run.pk}/", cookie=cookie) for _ in range(2)]
        try:
            for comm in comms:
                connected, _ = await comm.connect()
                assert connected
                assert "first try broke" in await receive_until(comm, lambda m: f'id="run-{run.pk}-steps"' in m)
            hub.stats.reset()
            await sync_to_async(services_retry)(run)
            for comm in comms:
                html = await receive_until(comm, lambda m: f'id="run-{run.pk}-steps"' in m)
                assert "status-queued" in html and "first try broke" not in html and "step-retrying" in html
            assert hub.stats.snapshot_reads == 1
        finally:
            for comm in comms:
                await comm.disconnect()

    async_to_sync(scenario)()


def services_retry(run: Run) -> None:
    from runs.engine import run_retry_from_failed_step

    assert run_retry_from_failed_step(run.pk)


def _kill_pubsub_connections() -> None:
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.REDIS_URL).client_kill_filter(_type="pubsub")


def test_run_list_sockets_share_one_subscription_one_read_of_the_counters_and_no_read_for_a_workers_event(
    cookie: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.RunListHub, "COUNTERS_INTERVAL", 600.0)  # the counters' re-read is not at issue
    run = make_run(status=RunStatus.QUEUED)
    queries: list[str] = []

    def counted(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        queries.append(sql)
        return execute(sql, params, many, context)

    async def scenario() -> None:
        comms = [socket("/ws/runs/", cookie=cookie) for _ in range(8)]
        try:
            for comm in comms:
                connected, _ = await comm.connect()
                assert connected
                await receive_until(comm, lambda m: f'id="run-{run.pk}"' in m)  # its snapshot
            await asyncio.gather(*(receive_until(comm, lambda m: "run-counters" in m) for comm in comms))
            assert realtime.subscriber().subscribers(realtime.runs_channel()) == 1
            hub.stats.reset()
            queries.clear()
            # What a worker publishes when it claims the run: everything the row shows.
            now = timezone.now().isoformat()
            data = {"started_at": now, "code_version": "v1", "cost_usd": "0", "steps_completed": 0}
            realtime.publish_now(realtime.run_changed(run.pk, RunStatus.RUNNING, **data), to_runs_list=True)
            rows = await asyncio.gather(
                *(receive_until(comm, lambda m: f'id="run-{run.pk}"' in m and "status-running" in m) for comm in comms)
            )
            assert len(set(rows)) == 1  # one rendering, the same frame for every socket
            assert hub.stats.snapshot_reads == 0
            assert queries == []
        finally:
            for comm in comms:
                await comm.disconnect()

    with connection.execute_wrapper(counted):
        async_to_sync(scenario)()


def _skip_an_event(run: Run) -> None:
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.REDIS_URL).incr(f"{realtime.channel_prefix()}:seq:{run.pk}")


# --- websockets: the run list ------------------------------------------------------------------------------


def test_it_pushes_new_runs_and_status_changes_to_the_run_list(cookie: str) -> None:
    older = make_run(status=RunStatus.QUEUED)

    async def scenario() -> None:
        comm = socket("/ws/runs/", cookie=cookie)
        connected, _ = await comm.connect()
        assert connected
        try:
            snapshot = await comm.receive_from(timeout=10)
            assert 'id="run-rows" hx-swap-oob="true"' in snapshot
            assert f'id="run-{older.pk}"' in snapshot

            newer = await _create_run()
            realtime.publish_now(realtime.run_changed(newer.pk, newer.status), to_runs_list=True)
            html = await receive_until(comm, lambda m: f'id="run-{newer.pk}"' in m)
            assert f'hx-swap-oob="beforebegin:#run-{older.pk}"' in html  # on top of the older one

            await _set_status(older, RunStatus.RUNNING)
            realtime.publish_now(realtime.run_changed(older.pk, RunStatus.RUNNING), to_runs_list=True)
            html = await receive_until(comm, lambda m: f'id="run-{older.pk}"' in m)
            assert 'hx-swap-oob="true"' in html and "status-running" in html
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()


def test_the_run_list_places_rows_by_age_and_keeps_only_the_newest(monkeypatch) -> None:
    monkeypatch.setattr(fragments, "RUN_LIST_LIMIT", 3)
    a, b, c, d, e = sorted((uuid.uuid4() for _ in range(5)), key=lambda pk: pk.int)
    consumer = RunListConsumer()
    consumer.shown = [d, b]

    def place(pk: uuid.UUID) -> list[str]:
        return consumer._place(Run(pk=pk, task_id="t", status=RunStatus.QUEUED, created_at=timezone.now()))

    assert f'hx-swap-oob="beforebegin:#run-{d}"' in place(e)[0]  # newest: above the newest shown
    assert consumer.shown == [e, d, b]
    assert place(a) == []  # the list is full and it's older than all of it
    messages = place(c)  # between d and b: above b, and b falls off the end
    assert f'hx-swap-oob="beforebegin:#run-{b}"' in messages[0]
    assert messages[1] == f'<tr id="run-{b}" hx-swap-oob="delete"></tr>'
    assert consumer.shown == [e, d, c]
    assert 'hx-swap-oob="true"' in place(d)[0]  # shown: replaced in place


def test_the_first_run_replaces_the_empty_list_message() -> None:
    consumer = RunListConsumer()
    consumer.shown = []
    pk = uuid.uuid4()
    messages = consumer._place(Run(pk=pk, task_id="t", status=RunStatus.QUEUED, created_at=timezone.now()))
    assert messages[0] == ""  # the "no runs" row stays, hidden by CSS: a second removal would miss its target
    assert 'hx-swap-oob="beforeend:#run-rows"' in messages[1] and f'id="run-{pk}"' in messages[1]


# database helpers for use inside the scenarios (the ORM is sync-only)


async def _create_step(run: Run, key: str, seq: int) -> Step:
    return await _sync(lambda: make_step(run, key, seq))


async def _create_run() -> Run:
    return await _sync(lambda: make_run(status=RunStatus.QUEUED))


async def _finish(run: Run) -> None:
    await _sync(
        lambda: Run.objects.filter(pk=run.pk).update(
            status=RunStatus.COMPLETED, output={"total": 55}, finished_at=timezone.now()
        )
    )


async def _set_status(run: Run, status: str) -> None:
    await _sync(lambda: Run.objects.filter(pk=run.pk).update(status=status))


async def _sync(fn: Callable[[], Any]) -> Any:
    return await sync_to_async(fn)()


# --- server-sent events --------------------------------------------------------------------------------------


@pytest.fixture
def secret() -> str:
    _key, secret = ApiKey.generate(name="sse-tests")
    return secret


async def stream_request(secret: str, run_id: Any) -> Any:
    # Headers per request: AsyncClient(headers=...) would send them under their WSGI names.
    return await AsyncClient().get(f"/api/runs/{run_id}/stream", headers={"authorization": f"Bearer {secret}"})


def stream_get(secret: str, run_id: Any) -> Any:
    return async_to_sync(stream_request)(secret, run_id)


@pytest.mark.parametrize("header", [None, "Token abc", "Bearer dex_not-a-key"], ids=["missing", "scheme", "unknown"])
def test_the_stream_refuses_requests_without_a_valid_key(header: str | None) -> None:
    run = make_run()
    headers = {"authorization": header} if header else {}
    response = async_to_sync(AsyncClient().get)(f"/api/runs/{run.pk}/stream", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_the_stream_refuses_a_revoked_key(secret: str) -> None:
    run = make_run()
    ApiKey.objects.update(revoked_at=timezone.now())
    response = stream_get(secret, run.pk)
    assert response.status_code == 401


def test_the_stream_answers_404_for_an_unknown_run(secret: str) -> None:
    response = stream_get(secret, uuid.uuid4())
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "not_found"


async def next_event(stream: AsyncIterator[bytes], timeout: float = 10) -> tuple[str, Any]:
    """The next `event:`/`data:` block, skipping heartbeat comments; ("end", None) when the stream ends."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for a server-sent event")
        try:
            chunk = (await asyncio.wait_for(anext(stream), left)).decode()
        except StopAsyncIteration:
            return "end", None
        if chunk.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in chunk.strip().splitlines())
        return fields["event"], json.loads(fields["data"])


def test_the_stream_sends_a_snapshot_then_the_runs_events_until_it_finishes(secret: str) -> None:
    run = make_run()
    make_step(run, "s1", 0)
    other = make_run()

    async def scenario() -> None:
        response = await stream_request(secret, run.pk)
        assert response.status_code == 200
        assert response["Content-Type"] == "text/event-stream"
        stream = aiter(response.streaming_content)
        try:
            kind, data = await next_event(stream)
            assert kind == "snapshot"
            assert data["run"]["status"] == "running" and data["run"]["id"] == str(run.pk)
            assert [(s["key"], s["status"]) for s in data["steps"]] == [("s1", "completed")]

            realtime.publish_now(realtime.RunEvent("step", str(other.pk), {"key": "elsewhere"}))
            realtime.publish_now(realtime.RunEvent("step", str(run.pk), {"key": "s2", "status": "running"}))
            assert await next_event(stream) == ("step", {"key": "s2", "status": "running"})

            realtime.publish_now(realtime.run_changed(run.pk, RunStatus.COMPLETED), to_runs_list=True)
            assert await next_event(stream) == ("run", {"status": "completed"})
            assert await next_event(stream) == ("end", None)
        finally:
            await stream.aclose()

    async_to_sync(scenario)()


def test_the_stream_numbers_its_events_and_sends_a_snapshot_after_a_lost_one(secret: str) -> None:
    run = make_run()

    async def scenario() -> None:
        response = await stream_request(secret, run.pk)
        stream = aiter(response.streaming_content)
        try:
            assert (await next_event(stream))[0] == "snapshot"
            realtime.publish_now(realtime.RunEvent("metadata", str(run.pk), {"key": "a", "value": 1}))
            first = (await asyncio.wait_for(anext(stream), 10)).decode()
            assert first.startswith("id: 1\nevent: metadata\n")
            realtime.publish_now(realtime.RunEvent("metadata", str(run.pk), {"key": "b", "value": 2}))
            assert (await asyncio.wait_for(anext(stream), 10)).decode().startswith("id: 2\n")

            await sync_to_async(_skip_an_event)(run)  # event 3 was lost on the way
            realtime.publish_now(realtime.RunEvent("metadata", str(run.pk), {"key": "d", "value": 4}))
            kind, data = await next_event(stream)
            assert kind == "snapshot" and data["run"]["id"] == str(run.pk)
            assert (await asyncio.wait_for(anext(stream), 10)).decode().startswith("id: 4\nevent: metadata\n")
        finally:
            await stream.aclose()

    async_to_sync(scenario)()


def test_the_stream_beats_and_ends_when_postgres_says_the_run_finished(secret: str, monkeypatch) -> None:
    """The channel layer is at-most-once: a lost final event must not leave the stream open forever."""
    monkeypatch.setattr(sse, "HEARTBEAT_SECONDS", 0.2)
    run = make_run()

    async def scenario() -> None:
        response = await stream_request(secret, run.pk)
        stream = aiter(response.streaming_content)
        try:
            assert (await next_event(stream))[0] == "snapshot"
            assert (await asyncio.wait_for(anext(stream), 5)).startswith(b": heartbeat")
            await _set_status(run, RunStatus.FAILED)  # and no event published
            assert await next_event(stream) == ("run", {"status": "failed"})
            assert await next_event(stream) == ("end", None)
        finally:
            await stream.aclose()

    async_to_sync(scenario)()


def test_the_stream_of_a_finished_run_is_just_its_snapshot(secret: str) -> None:
    run = make_run(status=RunStatus.COMPLETED, output={"total": 55})

    async def scenario() -> None:
        response = await stream_request(secret, run.pk)
        stream = aiter(response.streaming_content)
        kind, data = await next_event(stream)
        assert kind == "snapshot" and data["run"]["output"] == {"total": 55}
        assert await next_event(stream) == ("end", None)

    async_to_sync(scenario)()
