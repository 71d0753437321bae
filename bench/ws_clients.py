"""A process of websocket clients (or Redis subscribers) for the realtime bench: `python -m bench.ws_clients`.

The realtime scenario spreads its clients over several of these processes, so that none shares an event loop
(or a core's scheduling) with the server it measures. Requests arrive on stdin, one JSON object a line
(bench.harness.LineProcess); the first line written is `{"ready": true}`; each request is answered twice:
`{"connected": N}` once its N clients are connected (and, for websockets, each got the run's snapshot; with
`retries`, the handshakes tried again), then,
when every client saw what it waited for or the timeout passed, the arrivals.

  {"op": "watch", "url", "origin", "cookie", "clients", "run_id", "steps", "timeout"}
      N websocket clients on a run's page socket. Answer: {"arrivals": [{step pk: first arrival}, ...]}: per
      client, the wall-clock time each step's row (`id="step-<pk>"`) first arrived with `status-completed`,
      the end-of-run repaint (which carries `id="run-<id>-steps"`) excluded, so a lost push stays lost. A
      client hangs up once it has every step (or the repaint came), as a reader closing the page would.
  {"op": "redis", "url", "channel", "clients", "expect", "timeout"}
      N Redis subscribers of a channel whose messages are the publisher's wall clock. Answer:
      {"latencies_ms": [...], "lost": L} (arrival − stamp; L = messages expected but not received).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

STEP_ROW = re.compile(r'id="step-(\d+)"')
# Connections a process opens at once: daphne renders a snapshot per connection, and closes a handshake its
# consumer hasn't accepted within 5 s (daphne's websocket_connect_timeout), so a burst is kept small.
BATCH = 10
RETRIES = 3  # a handshake refused under load is tried again, as the run page's script reconnects


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


async def watch(request: dict) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    n, run_id, timeout = int(request["clients"]), request["run_id"], float(request["timeout"])
    steps = int(request["steps"])
    marker = f'id="run-{run_id}-steps"'
    headers = {"Cookie": request["cookie"]}
    sockets: list[Any] = []
    retries = 0

    async def open_one() -> Any:
        nonlocal retries
        for attempt in range(RETRIES + 1):
            try:
                return await connect(
                    request["url"], origin=request["origin"], additional_headers=headers, max_size=None
                )
            except (OSError, InvalidHandshake, TimeoutError):
                if attempt == RETRIES:
                    raise
                retries += 1
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    try:
        for first in range(0, n, BATCH):
            sockets += await asyncio.gather(*(open_one() for _ in range(first, min(n, first + BATCH))))
        snapshots = await asyncio.gather(*(asyncio.wait_for(ws.recv(), timeout) for ws in sockets))
        if not all(marker in s for s in snapshots):
            raise RuntimeError("a client's first message was not the run's snapshot")
        arrivals: list[dict[str, float]] = [{} for _ in sockets]

        async def read(i: int, ws: Any) -> None:
            try:
                while len(arrivals[i]) < steps:
                    text = await ws.recv()
                    at = time.time()
                    if marker in text:  # the repaint when the run ended: nothing more comes
                        break
                    if "status-completed" in text:
                        for pk in STEP_ROW.findall(text):
                            arrivals[i].setdefault(pk, at)
                await ws.close()
            except ConnectionClosed:
                return

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
        say({"connected": len(sockets), "retries": retries})
        _done, pending = await asyncio.wait(readers, timeout=timeout)
        for task in pending:
            task.cancel()
        say({"arrivals": arrivals})
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def subscribe(request: dict) -> None:
    import redis.asyncio as aioredis

    n, expect, timeout = int(request["clients"]), int(request["expect"]), float(request["timeout"])
    clients = [aioredis.Redis.from_url(request["url"]) for _ in range(n)]
    pubsubs = [c.pubsub() for c in clients]
    try:
        for first in range(0, n, BATCH):
            batch = pubsubs[first : first + BATCH]
            await asyncio.gather(*(ps.subscribe(request["channel"]) for ps in batch))
            await asyncio.gather(*(ps.get_message(timeout=5) for ps in batch))  # the confirmations
        got: list[list[float]] = [[] for _ in pubsubs]

        async def read(i: int, ps: Any) -> None:
            while len(got[i]) < expect:
                message = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    got[i].append((time.time() - float(message["data"])) * 1000)

        readers = [asyncio.create_task(read(i, ps)) for i, ps in enumerate(pubsubs)]
        say({"connected": len(pubsubs)})
        _done, pending = await asyncio.wait(readers, timeout=timeout)
        for task in pending:
            task.cancel()
        say({"latencies_ms": [x for g in got for x in g], "lost": sum(expect - len(g) for g in got)})
    finally:
        for ps in pubsubs:
            await ps.aclose()
        for c in clients:
            await c.aclose()


async def main() -> None:
    loop = asyncio.get_running_loop()
    say({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        request = json.loads(line)
        try:
            await {"watch": watch, "redis": subscribe}[request["op"]](request)
        except Exception as exc:  # the bench reads the error instead of waiting for an answer that never comes
            say({"error": repr(exc)[:500]})


if __name__ == "__main__":
    asyncio.run(main())
