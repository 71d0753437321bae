"""realtime: a step's commit → the step's fragment at a connected websocket client; raw Redis as the baseline.

Real parts: the bench starts daphne (dexweb.asgi, its own port), a Celery worker and websocket clients (the
`websockets` library, in this process's event loop) logged in with a session cookie, each on the run's page
socket `/ws/runs/<id>/` (runs/web/consumers.py: the consumer renders each step event into an HTML fragment from
Postgres and sends it).

The run is `bench-paced` (bench/scenario_agents.py): 10 no-op steps PAUSE apart, so each push is measured on
its own rather than queued behind the previous step's. Per round the run is created, the clients connect and
receive their snapshot, and only then is the run enqueued.

Commit time: the worker runs with DEX_BENCH_COMMIT_LEDGER set, which wraps `runs.realtime.publish_now`: the
engine calls it right after a step's commit statement returned (`_fenced_write`, then `publish_now` of the
step's "completed" event), and the wrapper reads the wall clock first thing, before publishing, then appends
(run, step key, time) to a ledger file once the publish call returned. Arrival: the client's wall clock when
its receive loop got the message (the bench and the worker share the machine's clock). A step counts as
arrived at the first fragment naming its row (`id="step-<pk>"`) with `status-completed`; the repaint the
consumer sends when the run ends (it carries `id="run-<id>-steps"`) is not counted, so a lost push is lost.
latency = arrival − commit, per client and step.

Baseline, alternating with it in the same run: raw Redis PUBLISH → SUBSCRIBE on the same Redis, a publisher
thread in this process stamping each message with the clock right before PUBLISH, subscribers
(redis.asyncio) in the same event loop as the websocket clients, the same pace and count.
Variants: dex_1 / dex_100 (1 / 100 websocket clients) and redis_1 / redis_100 (1 / 100 subscribers),
alternated per round after a warm-up, 5 repeats. Per repeat: p50 of dex_1, p99 of dex_100 over every
client's steps; `ratio_p50_vs_redis` = dex_1 p50 / redis_1 p50 paired per repeat; median with min–max.
All clients share one event loop: at 100 clients, a message's arrival time includes waiting its turn in
that loop (the same for the Redis subscribers, whose p99 is reported beside it).
With --tiny the 100-client variants use 5. The 100-client variants run in the first MANY_REPEATS repeats (2 with
--quick: a 100-client round takes about a minute today, see below) and get no warm-up round of their own.

What the 100-client figure shows. First measured 2026-11-24 at 33–40 s p99 (3.7 s on a quiet box): every
consumer, for every step event (two per step: running, completed), fetched the step through channels'
`database_sync_to_async`, which runs on one thread per daphne process shared by all consumers, and rendered
its own fragment: 100 clients x 20 events were served one after another. Since then the consumers of a process
share one read per event (runs.web.consumers.SharedReads, single-flight) and one rendering per fragment: 144 ms p99
on a quiet box. What is left is sending 100 websocket frames per event from one event loop (daphne's and,
in this bench, the clients' own loop too): p50 at 100 clients is ~50 ms. Raw Redis fan-out to the same 100
subscribers stays at ~7 ms p99.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import BenchEnv, Process, goal_met, log, rounded, spread

NAME = "realtime"
GOAL = {"ws_p50_ms": "<= 5", "ws_p99_ms_100_clients": "<= 50", "lost_messages": "== 0"}
STEPS = 10
PAUSE = 0.02
MANY = {"full": 100, "quick": 100, "tiny": 5}
REPEATS = {"full": 5, "quick": 5, "tiny": 1}
ROUNDS_ONE = {"full": 6, "quick": 2, "tiny": 1}  # rounds per repeat of the 1-client variants
ROUNDS_MANY = {"full": 2, "quick": 1, "tiny": 1}
MANY_REPEATS = {"full": 5, "quick": 2, "tiny": 1}  # repeats that include the 100-client variants
WARMUP = 1
ROUND_TIMEOUT = 60.0


def run(env: BenchEnv) -> dict:
    started = time.monotonic()
    _reset()
    ledger = env.workdir / "commit-ledger.tsv"
    ledger.touch()
    port = _free_port()
    daphne = Process(
        env,
        "daphne",
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dexweb.asgi:application"],
        env={"DEX_LOG_LEVEL": "INFO"},  # its "Listening on" line says it is ready
    )
    env.stack.callback(daphne.stop)
    with ThreadPoolExecutor(2) as pool:  # both take seconds to start on a busy machine: side by side
        worker = pool.submit(env.start_worker, name="realtime", env={"DEX_BENCH_COMMIT_LEDGER": str(ledger)})
        pool.submit(daphne.start, ready="Listening on TCP address").result()
        worker.result()
    site = Site(port, _session_cookie())
    many = MANY[env.sizes.name]
    bench = Realtime(env, site, ledger)

    variants = {
        "dex_1": lambda: bench.dex_round(1),
        "redis_1": lambda: bench.redis_round(1),
        "dex_many": lambda: bench.dex_round(many),
        "redis_many": lambda: bench.redis_round(many),
    }
    rounds = {
        "dex_1": ROUNDS_ONE[env.sizes.name],
        "redis_1": ROUNDS_ONE[env.sizes.name],
        "dex_many": ROUNDS_MANY[env.sizes.name],
        "redis_many": ROUNDS_MANY[env.sizes.name],
    }
    # The 1-client rounds warm daphne, the worker and the templates up; a 100-client round costs a minute while
    # daphne's consumers can't keep up (see the module docstring), so it gets no warm-up round of its own.
    log(f"warm-up: {WARMUP} round of the 1-client variants")
    for _ in range(WARMUP):
        for name in ("dex_1", "redis_1"):
            variants[name]()
    bench.lost = dict.fromkeys(variants, 0)
    samples: dict[str, list[list[float]]] = {name: [] for name in variants}
    for r in range(REPEATS[env.sizes.name]):
        for name in variants:
            samples[name].append([])
        for i in range(max(rounds.values())):
            for name, fn in variants.items():
                if name.endswith("_many") and r >= MANY_REPEATS[env.sizes.name]:
                    continue
                if i < rounds[name]:
                    latencies, lost = fn()
                    samples[name][r].extend(latencies)
                    bench.lost[name] += lost
        many_text = (
            f", dex_{many} p99 {_pct(samples['dex_many'][r], 99):.2f} ms, "
            f"redis_{many} p99 {_pct(samples['redis_many'][r], 99):.2f} ms"
            if r < MANY_REPEATS[env.sizes.name]
            else ""
        )
        log(
            f"repeat {r + 1}: dex_1 p50 {_pct(samples['dex_1'][r], 50):.2f} ms, redis_1 p50 "
            f"{_pct(samples['redis_1'][r], 50):.2f} ms{many_text}"
        )

    for name in ("dex_many", "redis_many"):
        samples[name] = samples[name][: MANY_REPEATS[env.sizes.name]]  # the repeats they ran in
    series = {
        "ws_p50_ms": [_pct(rep, 50) for rep in samples["dex_1"]],
        "ws_p99_ms_100_clients": [_pct(rep, 99) for rep in samples["dex_many"]],
        "redis_p50_ms": [_pct(rep, 50) for rep in samples["redis_1"]],
        "redis_p99_ms_100_clients": [_pct(rep, 99) for rep in samples["redis_many"]],
        "ws_p99_ms": [_pct(rep, 99) for rep in samples["dex_1"]],
        "ws_p50_ms_100_clients": [_pct(rep, 50) for rep in samples["dex_many"]],
    }
    series["ratio_p50_vs_redis"] = [a / b for a, b in zip(series["ws_p50_ms"], series["redis_p50_ms"], strict=True)]
    series["ratio_p99_100_clients_vs_redis"] = [
        a / b for a, b in zip(series["ws_p99_ms_100_clients"], series["redis_p99_ms_100_clients"], strict=True)
    ]
    spreads = {name: spread(values) for name, values in series.items()}
    figures: dict[str, Any] = {name: s["median"] for name, s in spreads.items()}
    figures["lost_messages"] = bench.lost["dex_1"] + bench.lost["dex_many"]
    figures["lost_messages_redis"] = bench.lost["redis_1"] + bench.lost["redis_many"]
    figures["clients_many"] = many
    goals_met = {name: goal_met(figures.get(name), goal) for name, goal in GOAL.items()}
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": all(goals_met.values()),
            "goals_met": goals_met,
            "ranges": {name: [s["min"], s["max"]] for name, s in spreads.items()},
            "per_repeat": series,
            "messages": {name: sum(len(rep) for rep in reps) for name, reps in samples.items()},
            "lost_by_variant": bench.lost,
            "sizes": {
                "steps": STEPS,
                "pause_s": PAUSE,
                "clients_many": many,
                "repeats": REPEATS[env.sizes.name],
                "rounds": rounds,
            },
            "seconds": time.monotonic() - started,
            "missed_because": (
                "one read and one rendering per event are shared by all the watchers of a run in a daphne process, "
                "but each client's frame is still sent from one event loop, one after another (and this bench's "
                "100 clients share one loop too): p99 at 100 clients is a few hundred ms where raw Redis fans "
                "out in ~7 ms. Several daphne processes behind a proxy spread the watchers."
            ),
            "method": (
                "commit = worker's wall clock read first thing in runs.realtime.publish_now, which the engine "
                "calls right after the step's commit returned; arrival = client's wall clock on receipt of the "
                "step's first completed fragment (the end-of-run repaint excluded). Variants alternate per round "
                "after a warm-up; p50/p99 per repeat over all clients' steps; ratios paired per repeat, median "
                "with min-max. Baseline: PUBLISH (stamped just before) -> SUBSCRIBE on the same Redis."
            ),
        }
    )


def _reset() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE runs_run CASCADE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_cookie() -> str:
    """A viewer's session (the page socket refuses anonymous users), saved in the bench database."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench-viewer")
    client = Client(SERVER_NAME="localhost")
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


class Site:
    def __init__(self, port: int, cookie: str):
        self.port = port
        self.cookie = cookie
        self.origin = f"http://127.0.0.1:{port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


_STEP_ROW = re.compile(r'id="step-(\d+)"')


class Realtime:
    def __init__(self, env: BenchEnv, site: Site, ledger: Path):
        self.env = env
        self.site = site
        self.ledger = ledger
        self.lost: dict[str, int] = {}

    # -- Dex: worker → Redis → daphne → websocket ---------------------------------------------------------------
    def dex_round(self, clients: int) -> tuple[list[float], int]:
        from django.utils import timezone

        from bench.scenario_agents import PACED_TASK_ID
        from runs.models import Run, Step

        run = Run.objects.create(
            task_id=PACED_TASK_ID,
            payload={"steps": STEPS, "pause": PAUSE},
            queue=self.env.queue,
            enqueued_at=timezone.now(),
        )
        run_id = str(run.id)
        logs = asyncio.run(self._watch(run_id, clients))
        deadline = time.monotonic() + ROUND_TIMEOUT
        while Run.objects.values_list("status", flat=True).get(pk=run_id) != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the realtime run {run_id} did not complete")
            time.sleep(0.05)
        keys = dict(Step.objects.filter(run_id=run_id).values_list("id", "key"))
        committed = self._commits(run_id)
        if len(committed) != STEPS:
            raise RuntimeError(f"the commit ledger has {len(committed)} of {STEPS} steps of {run_id}")
        latencies: list[float] = []
        lost = 0
        for messages in logs:
            arrived: dict[str, float] = {}
            for at, text in messages:
                if f'id="run-{run_id}-steps"' in text or "status-completed" not in text:
                    continue
                for pk in _STEP_ROW.findall(text):
                    key = keys.get(int(pk))
                    if key is not None and key not in arrived:
                        arrived[key] = at
            lost += STEPS - len(arrived)
            latencies.extend((at - committed[key]) * 1000 for key, at in arrived.items())
        return latencies, lost

    def _commits(self, run_id: str) -> dict[str, float]:
        out = {}
        for line in self.ledger.read_text().splitlines():
            rid, key, at = line.split("\t")
            if rid == run_id:
                out.setdefault(key, float(at))
        return out

    async def _watch(self, run_id: str, clients: int) -> list[list[tuple[float, str]]]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        from runs.tasks import execute_run

        headers = {"Cookie": self.site.cookie}
        url = self.site.ws_url(f"/ws/runs/{run_id}/")
        sockets = []
        try:
            # Connect in batches: daphne renders a snapshot per connection.
            for first in range(0, clients, 20):
                batch = range(first, min(clients, first + 20))
                sockets += await asyncio.gather(
                    *(connect(url, origin=self.site.origin, additional_headers=headers, max_size=None) for _ in batch)
                )
            snapshots = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 30) for ws in sockets))
            if not all(f'id="run-{run_id}-steps"' in s for s in snapshots):
                raise RuntimeError("a client's first message was not the run's snapshot")
            logs: list[list[tuple[float, str]]] = [[] for _ in sockets]
            marker = f'id="run-{run_id}-steps"'

            async def read(i: int, ws: Any) -> None:
                try:
                    while True:
                        text = await ws.recv()
                        logs[i].append((time.time(), text))
                        if marker in text:  # the repaint when the run ended: nothing more comes
                            return
                except ConnectionClosed:
                    return

            readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
            await asyncio.to_thread(execute_run.apply_async, args=[run_id], queue=self.env.queue)
            done, pending = await asyncio.wait(readers, timeout=ROUND_TIMEOUT)
            for task in pending:
                task.cancel()
            return logs
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    # -- the baseline: raw Redis PUBLISH → SUBSCRIBE ---------------------------------------------------------
    def redis_round(self, subscribers: int) -> tuple[list[float], int]:
        return asyncio.run(self._redis(subscribers))

    async def _redis(self, subscribers: int) -> tuple[list[float], int]:
        import redis
        import redis.asyncio as aioredis

        channel = f"dexbench:{self.env.session}:rt:{uuid.uuid4().hex}"
        clients = [aioredis.Redis.from_url(self.env.redis_url) for _ in range(subscribers)]
        pubsubs = [c.pubsub() for c in clients]
        try:
            for ps in pubsubs:
                await ps.subscribe(channel)
                await ps.get_message(timeout=3)  # the subscribe confirmation
            arrivals: list[list[tuple[float, bytes]]] = [[] for _ in pubsubs]

            async def read(i: int, ps: Any) -> None:
                while len(arrivals[i]) < STEPS:
                    message = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        arrivals[i].append((time.time(), message["data"]))

            readers = [asyncio.create_task(read(i, ps)) for i, ps in enumerate(pubsubs)]

            def publish() -> None:
                publisher = redis.Redis.from_url(self.env.redis_url)
                try:
                    for _ in range(STEPS):
                        time.sleep(PAUSE)
                        publisher.publish(channel, f"{time.time():.6f}")
                finally:
                    publisher.close()

            thread = threading.Thread(target=publish, daemon=True)
            thread.start()
            done, pending = await asyncio.wait(readers, timeout=ROUND_TIMEOUT)
            for task in pending:
                task.cancel()
            thread.join(timeout=10)
        finally:
            for ps in pubsubs:
                await ps.aclose()
            for c in clients:
                await c.aclose()
        latencies = [(at - float(data)) * 1000 for got in arrivals for at, data in got]
        lost = sum(STEPS - len(got) for got in arrivals)
        return latencies, lost
