"""Live updates end to end: a real daphne serving dexweb.asgi, a real Celery worker executing the run, the
events going worker → Redis → daphne → a real websocket (or SSE) client, with no reload in between."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from redis import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from runs import services
from runs.models import ApiKey, Run, RunStatus
from tests.conftest import Proc, Processes, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STEPS = [f"s{i}" for i in range(1, 11)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daphne:
    def __init__(self, proc: Proc, port: int):
        self.proc = proc
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def daphne(dex_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daphne]:
    """One daphne for the module (a start costs seconds); each test watches its own runs."""
    port = free_port()
    args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dexweb.asgi:application"]
    proc = Proc("daphne", args, dex_env, tmp_path_factory.mktemp("daphne")).start()
    try:
        proc.wait_for_log("Listening on TCP address")
        yield Daphne(proc, port)
    finally:
        proc.stop()


@pytest.fixture
def session_cookie() -> str:
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def http_get(daphne: Daphne, path: str, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", daphne.port, timeout=30)
    conn.request("GET", path, headers=headers)
    return conn, conn.getresponse()


def test_it_pushes_every_step_of_a_run_to_its_page_as_the_worker_executes_it(
    daphne: Daphne, processes: Processes, session_cookie: str, ledger: Path
) -> None:
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.05})

    _conn, page = http_get(daphne, f"/runs/{run.pk}/", {"Cookie": session_cookie})
    assert page.status == 200
    assert f'ws-connect="/ws/runs/{run.pk}/"' in page.read().decode()

    async def scenario() -> tuple[list[list[str]], list[str]]:
        headers = {"Cookie": session_cookie}
        page_url = daphne.ws_url(f"/ws/runs/{run.pk}/")
        async with (
            # Three tabs on the run: daphne's hub for the run writes every frame to each of them.
            connect(page_url, origin=daphne.origin, additional_headers=headers) as page1,
            connect(page_url, origin=daphne.origin, additional_headers=headers) as page2,
            connect(page_url, origin=daphne.origin, additional_headers=headers) as page3,
            connect(daphne.ws_url("/ws/runs/"), origin=daphne.origin, additional_headers=headers) as listing,
        ):
            pages = [page1, page2, page3]
            page_messages = [[await asyncio.wait_for(page.recv(), 10)] for page in pages]
            list_messages = [await asyncio.wait_for(listing.recv(), 10)]
            assert all(f'id="run-{run.pk}-steps"' in messages[0] for messages in page_messages)
            assert f'id="run-{run.pk}"' in list_messages[0]

            # Only now does a worker exist to execute the run: every step happens while the pages watch.
            await asyncio.to_thread(processes.worker)

            finished = f'id="run-{run.pk}-header" class="card run-header" hx-swap-oob="true"'
            deadline = time.monotonic() + 60
            for page, messages in zip(pages, page_messages, strict=True):
                while not any(finished in m and "status-completed" in m for m in messages[1:]):
                    messages.append(await asyncio.wait_for(page.recv(), max(0.1, deadline - time.monotonic())))
            while not any(f'id="run-{run.pk}"' in m and "status-completed" in m for m in list_messages[1:]):
                list_messages.append(await asyncio.wait_for(listing.recv(), max(0.1, deadline - time.monotonic())))
            return page_messages, list_messages

    page_messages, list_messages = async_to_sync(scenario)()

    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED
    steps = {step.key: step.pk for step in run.steps.all()}
    assert sorted(steps, key=lambda key: int(key[1:])) == STEPS
    for messages in page_messages:
        # Pushed as they happened, not just repainted at the end (the repaint holds the whole step list).
        pushes = [m for m in messages[1:] if f'id="run-{run.pk}-steps"' not in m]
        for key, pk in steps.items():
            assert any(f'id="step-{pk}"' in m and "status-completed" in m for m in pushes), (
                f"no live fragment for {key}"
            )
        assert any("step-pending-" in m and "status-running" in m for m in pushes)
    assert any("status-running" in m for m in list_messages[1:])


def test_the_sse_stream_carries_a_runs_events_until_it_finishes(daphne: Daphne, processes: Processes, ledger: Path):
    _key, secret = ApiKey.generate(name="sse")
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger)})

    _conn, response = http_get(daphne, f"/api/runs/{run.pk}/stream", {"Authorization": f"Bearer {secret}"})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    events: list[tuple[str, Any]] = [read_event(response)]
    assert events[0][0] == "snapshot" and events[0][1]["run"]["status"] == RunStatus.QUEUED

    processes.worker()
    while (event := read_event(response))[0] != "end":  # the server ends the stream after the last event
        events.append(event)

    completed = [data["key"] for kind, data in events if kind == "step" and data.get("status") == "completed"]
    assert completed == STEPS
    assert events[-1][0] == "run" and events[-1][1]["status"] == "completed"
    assert Run.objects.get(pk=run.pk).status == RunStatus.COMPLETED


def test_clients_that_go_away_leave_the_runs_channel(daphne: Daphne, dex_env: dict[str, str], session_cookie: str):
    """A closed tab or a dropped SSE client must not stay subscribed: Redis is asked who listens."""
    _key, secret = ApiKey.generate(name="sse")
    run = Run.objects.create(task_id="t-ten-steps", status=RunStatus.RUNNING)
    redis = Redis.from_url(settings.REDIS_URL)
    group = f"{dex_env['DEX_CHANNEL_PREFIX']}:run:{run.pk}"  # runs.realtime.run_channel

    def listeners() -> int:
        return redis.pubsub_numsub(group)[0][1]

    conn, response = http_get(daphne, f"/api/runs/{run.pk}/stream", {"Authorization": f"Bearer {secret}"})
    assert read_event(response)[0] == "snapshot"
    assert listeners() == 1
    response.close()
    conn.close()
    wait_for(lambda: listeners() == 0, timeout=15, what="the SSE client to leave the channel")

    async def watch_and_leave() -> None:
        headers = {"Cookie": session_cookie}
        async with connect(
            daphne.ws_url(f"/ws/runs/{run.pk}/"), origin=daphne.origin, additional_headers=headers
        ) as ws:
            await asyncio.wait_for(ws.recv(), 10)
            assert listeners() == 1

    async_to_sync(watch_and_leave)()
    wait_for(lambda: listeners() == 0, timeout=15, what="the websocket's hub to leave the channel")


def test_an_oversized_frame_closes_the_socket_with_1009_and_no_traceback(daphne: Daphne, session_cookie: str):
    """Over Dex's cap (DEX_MAX_WS_MESSAGE_BYTES, 64 KiB) the consumer closes with 1009 ("message too big") and
    the server logs no traceback. (Over daphne's own cap, 1 MiB, autobahn drops the connection: 1006.)"""
    headers = {"Cookie": session_cookie}

    async def close_code(size: int) -> int | None:
        async with connect(
            daphne.ws_url("/ws/runs/"), origin=daphne.origin, additional_headers=headers, max_size=None
        ) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # the snapshot
            await ws.send("x" * size)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    assert async_to_sync(close_code)(100 * 1024) == 1009
    assert "Traceback" not in daphne.proc.log()


def read_event(response: http.client.HTTPResponse) -> tuple[str, Any]:
    """The next event of a server-sent-events body (heartbeat comments skipped); ("end", None) at its end."""
    fields: dict[str, str] = {}
    while True:
        line = response.readline()
        if not line:
            return "end", None
        text = line.decode().rstrip("\n")
        if text == "" and fields:
            return fields["event"], json.loads(fields["data"])
        if text and not text.startswith(":"):
            name, _, value = text.partition(": ")
            fields[name] = value
