"""realtime: a step's commit → the step's fragment at connected websocket clients; raw Redis as the baseline.

Real parts: the bench starts daphne (dexweb.asgi, its own port), a Celery worker, and CLIENT_PROCESSES processes
of websocket clients (bench/ws_clients.py, the `websockets` library), none of them the server's or the bench's
own process; the clients of a round are spread evenly over them. Each client is logged in with a session cookie
and watches the run's page socket `/ws/runs/<id>/` (runs/web/consumers.py; the run's hub in daphne,
runs/web/hub.py, renders each event once and writes the frame to every socket).

The run is `bench-paced` (bench/scenario_agents.py): 10 no-op steps PAUSE apart, so each push is measured on
its own rather than queued behind the previous step's. Per round the run is created, the clients connect and
receive their snapshot, and only then is the run enqueued.

Commit time: the worker runs with DEX_BENCH_COMMIT_LEDGER set, which wraps `runs.realtime.publish_now`: the
engine calls it right after a step's commit statement returned, and the wrapper reads the wall clock first
thing, before publishing, then appends (run, step key, time) to a ledger file once the publish call returned.
Arrival: the client process's wall clock when its receive loop got the message (every process shares the
machine's clock). A step counts as arrived at the first fragment naming its row (`id="step-<pk>"`) with
`status-completed`; the repaint the consumer sends when the run ends is not counted, so a lost push is lost.
latency = arrival − commit, per client and step.

Baseline, alternating with it in the same run: raw Redis PUBLISH → SUBSCRIBE on the same Redis, a publisher
thread in this process stamping each message with the clock right before PUBLISH, the same number of
subscribers spread over the same client processes, the same pace and count.
Variants, alternated per round after a warm-up, every one in each of the 5 repeats: dex_1 / dex_100 /
dex_1000 (websocket clients) and redis_1 / redis_100 / redis_1000 (subscribers; with --quick redis_1000, which
has no goal, in the first 2 repeats). Per repeat: p50 of dex_1,
p99 of dex_100 and of dex_1000 over every client's steps; ratios to Redis paired per repeat; median with
min–max. With --tiny the 100- and 1,000-client variants use 5 and 10 clients (the figures keep their names).

CPU per step with one watcher: CPU seconds over the dex_1 rounds, from the enqueue to the client's last
message, summed over the worker, daphne, every Postgres process, Redis and this process (which enqueues the run),
per step. The steps are paced, so the worker's and daphne's idle upkeep over the round is billed too.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import BenchEnv, CpuMeter, LineProcess, Process, free_port, judge, log, rounded, spread

NAME = "realtime"
GOAL = {
    "ws_p50_ms": "<= 5",
    "ws_p99_ms_100_clients": "<= 50",
    "ws_p99_ms_1000_clients": "<= 250",
    "lost_messages": "== 0",
}
STEPS = 10
PAUSE = 0.02
CLIENT_PROCESSES = 4
MANY = {"full": 100, "quick": 100, "tiny": 5}
HUGE = {"full": 1000, "quick": 1000, "tiny": 10}
REPEATS = {"full": 5, "quick": 5, "tiny": 1}
ROUNDS = {  # rounds per repeat
    "full": {"1": 6, "many": 2, "huge": 1},
    "quick": {"1": 2, "many": 1, "huge": 1},
    "tiny": {"1": 1, "many": 1, "huge": 1},
}
WARMUP = 1
# Raw Redis at 1,000 subscribers has no goal: --quick measures it in the first 2 repeats.
HUGE_BASELINE_REPEATS = {"full": 5, "quick": 2, "tiny": 1}
ROUND_TIMEOUT = 120.0


def run(env: BenchEnv) -> dict:
    import redis

    started = time.monotonic()
    _reset()
    ledger = env.workdir / "commit-ledger.tsv"
    ledger.touch()
    port = free_port()
    daphne = Process(
        env,
        "daphne",
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dexweb.asgi:application"],
        env={"DEX_LOG_LEVEL": "INFO"},  # its "Listening on" line says it is ready
    )
    env.stack.callback(daphne.stop)
    clients = [
        LineProcess(env, f"ws-clients-{i}", [sys.executable, "-m", "bench.ws_clients"]) for i in range(CLIENT_PROCESSES)
    ]
    with ThreadPoolExecutor(2 + len(clients)) as pool:  # each takes seconds to start on a busy machine
        worker = pool.submit(env.start_worker, name="realtime", env={"DEX_BENCH_COMMIT_LEDGER": str(ledger)})
        started_clients = [pool.submit(c.start) for c in clients]
        pool.submit(daphne.start, ready="Listening on TCP address").result()
        worker = worker.result()
        for c in started_clients:
            c.result()
    site = Site(port, _session_cookie())
    sizes = env.sizes.name
    many, huge = MANY[sizes], HUGE[sizes]
    bench = Realtime(env, site, ledger, clients)
    meter = CpuMeter(
        env,
        worker=worker,
        databases=[env.database_name],
        redis=redis.Redis.from_url(env.redis_url),
        extra={"daphne": daphne.pids},
    )
    cpu: list[dict[str, float]] = []

    def dex_1_metered() -> tuple[list[float], int]:
        return bench.dex_round(1, meter=meter, cpu=cpu)

    variants = {
        "dex_1": dex_1_metered,
        "redis_1": lambda: bench.redis_round(1),
        "dex_many": lambda: bench.dex_round(many),
        "redis_many": lambda: bench.redis_round(many),
        "dex_huge": lambda: bench.dex_round(huge),
        "redis_huge": lambda: bench.redis_round(huge),
    }
    rounds = {name: ROUNDS[sizes][name.split("_", 1)[1]] for name in variants}
    log(f"warm-up: {WARMUP} round of the 1- and {many}-client variants")
    for _ in range(WARMUP):
        for name in ("dex_1", "redis_1", "dex_many", "redis_many"):
            variants[name]()
    cpu.clear()
    bench.lost = dict.fromkeys(variants, 0)
    bench.connect_retries = 0
    samples: dict[str, list[list[float]]] = {name: [] for name in variants}
    for r in range(REPEATS[sizes]):
        for name in variants:
            samples[name].append([])
        for i in range(max(rounds.values())):
            for name, fn in variants.items():
                if i < rounds[name] and (name != "redis_huge" or r < HUGE_BASELINE_REPEATS[sizes]):
                    latencies, lost = fn()
                    samples[name][r].extend(latencies)
                    bench.lost[name] += lost
        log(
            f"repeat {r + 1}: dex_1 p50 {_pct(samples['dex_1'][r], 50):.2f} ms (redis "
            f"{_pct(samples['redis_1'][r], 50):.2f}), dex_{many} p99 {_pct(samples['dex_many'][r], 99):.1f} ms "
            f"(redis {_pct(samples['redis_many'][r], 99):.1f}), dex_{huge} p99 "
            f"{_pct(samples['dex_huge'][r], 99):.1f} ms (redis {_pct(samples['redis_huge'][r], 99):.1f})"
        )

    series = {
        "ws_p50_ms": [_pct(rep, 50) for rep in samples["dex_1"]],
        "ws_p99_ms_100_clients": [_pct(rep, 99) for rep in samples["dex_many"]],
        "ws_p99_ms_1000_clients": [_pct(rep, 99) for rep in samples["dex_huge"]],
        "redis_p50_ms": [_pct(rep, 50) for rep in samples["redis_1"]],
        "redis_p99_ms_100_clients": [_pct(rep, 99) for rep in samples["redis_many"]],
        "redis_p99_ms_1000_clients": [_pct(rep, 99) for rep in samples["redis_huge"] if rep],
        "ws_p99_ms": [_pct(rep, 99) for rep in samples["dex_1"]],
        "ws_p50_ms_100_clients": [_pct(rep, 50) for rep in samples["dex_many"]],
        "ws_p50_ms_1000_clients": [_pct(rep, 50) for rep in samples["dex_huge"]],
    }
    series["ratio_p50_vs_redis"] = [a / b for a, b in zip(series["ws_p50_ms"], series["redis_p50_ms"], strict=True)]
    for clients_n in ("100", "1000"):
        series[f"ratio_p99_{clients_n}_clients_vs_redis"] = [
            a / b
            for a, b in zip(
                series[f"ws_p99_ms_{clients_n}_clients"], series[f"redis_p99_ms_{clients_n}_clients"], strict=False
            )
        ]
    spreads = {name: spread(values) for name, values in series.items()}
    figures: dict[str, Any] = {name: s["median"] for name, s in spreads.items()}
    figures["lost_messages"] = sum(v for k, v in bench.lost.items() if k.startswith("dex"))
    figures["lost_messages_redis"] = sum(v for k, v in bench.lost.items() if k.startswith("redis"))
    figures["ws_connect_retries"] = bench.connect_retries
    figures["clients_many"] = many
    figures["clients_huge"] = huge
    cpu_parts: dict[str, float] = {}
    for delta in cpu:
        for part, seconds in delta.items():
            cpu_parts[part] = cpu_parts.get(part, 0.0) + seconds
    cpu_per_step = {part: s * 1000 / (len(cpu) * STEPS) for part, s in cpu_parts.items()} if cpu else {}
    if cpu_per_step:
        figures["cpu_ms_per_step_1_watcher"] = sum(cpu_per_step.values())
    goals_met, met = judge(figures, GOAL)
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": met,
            "goals_met": goals_met,
            "ranges": {name: [s["min"], s["max"]] for name, s in spreads.items()},
            "per_repeat": series,
            "messages": {name: sum(len(rep) for rep in reps) for name, reps in samples.items()},
            "lost_by_variant": bench.lost,
            "cpu_ms_per_step_1_watcher": cpu_per_step,
            "sizes": {
                "steps": STEPS,
                "pause_s": PAUSE,
                "clients_many": many,
                "clients_huge": huge,
                "client_processes": CLIENT_PROCESSES,
                "repeats": REPEATS[sizes],
                "rounds": rounds,
            },
            "seconds": time.monotonic() - started,
            "missed_because": (
                "per daphne process one hub per run renders each event once per variant from its mirror (no "
                "query) and writes the same frame to every socket, but the writes go one socket after another "
                "through daphne/autobahn's Python framing on one event loop, on 2 cores shared with the client "
                "processes; events that queue up meanwhile go out as one frame. Several daphne processes behind "
                "a proxy spread the watchers."
            ),
            "method": (
                "commit = worker's wall clock read first thing in runs.realtime.publish_now, which the engine "
                "calls right after the step's commit returned; arrival = the client process's wall clock on "
                "receipt of the step's first completed fragment (the end-of-run repaint excluded); a handshake "
                "daphne refused under load is tried again (ws_connect_retries counts them). Clients and "
                f"Redis subscribers are spread over {CLIENT_PROCESSES} processes of their own. Variants "
                "alternate per round after a warm-up; p50/p99 per repeat over all clients' steps; ratios paired "
                "per repeat, median with min-max. Baseline: PUBLISH (stamped just before) -> SUBSCRIBE on the "
                "same Redis. cpu_ms_per_step_1_watcher: CPU from enqueue to the last message of the dex_1 "
                "rounds (worker, daphne, every Postgres process, Redis, this process) per step, paced steps: "
                "idle upkeep included."
            ),
        }
    )


def _reset() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE runs_run CASCADE")


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


class Realtime:
    def __init__(self, env: BenchEnv, site: Site, ledger: Path, clients: list[LineProcess]):
        self.env = env
        self.site = site
        self.ledger = ledger
        self.clients = clients
        self.lost: dict[str, int] = {}
        self.connect_retries = 0  # websocket handshakes daphne refused under load, tried again

    def _spread(self, request: dict, n: int) -> list[LineProcess]:
        """Send `request` to the client processes, n clients shared out evenly; wait until all are connected."""
        shares = [n // len(self.clients) + (1 if i < n % len(self.clients) else 0) for i in range(len(self.clients))]
        busy = [(proc, share) for proc, share in zip(self.clients, shares, strict=True) if share]
        for proc, share in busy:
            proc.send({**request, "clients": share, "timeout": ROUND_TIMEOUT})
        for proc, _share in busy:
            answer = proc.receive(ROUND_TIMEOUT)
            if "connected" not in answer:
                raise RuntimeError(f"{proc.name}: {answer}")
            self.connect_retries += int(answer.get("retries", 0))
        return [proc for proc, _share in busy]

    @staticmethod
    def _results(procs: list[LineProcess]) -> list[dict]:
        answers = [proc.receive(ROUND_TIMEOUT + 30) for proc in procs]
        for proc, answer in zip(procs, answers, strict=True):
            if "error" in answer:
                raise RuntimeError(f"{proc.name}: {answer['error']}")
        return answers

    # -- Dex: worker → Redis → daphne → websocket ---------------------------------------------------------------
    def dex_round(
        self, clients: int, *, meter: CpuMeter | None = None, cpu: list | None = None
    ) -> tuple[list[float], int]:
        """One run watched by `clients` clients; with a `meter`, the CPU from the enqueue to the clients' last
        message (connecting and the snapshot left out) is appended to `cpu`."""
        from django.utils import timezone

        from bench.scenario_agents import PACED_TASK_ID
        from runs.models import Run, Step
        from runs.tasks import execute_run

        run = Run.objects.create(
            task_id=PACED_TASK_ID,
            payload={"steps": STEPS, "pause": PAUSE},
            queue=self.env.queue,
            enqueued_at=timezone.now(),
        )
        run_id = str(run.id)
        request = {
            "op": "watch",
            "url": self.site.ws_url(f"/ws/runs/{run_id}/"),
            "origin": self.site.origin,
            "cookie": self.site.cookie,
            "run_id": run_id,
            "steps": STEPS,
        }
        t0 = time.monotonic()
        procs = self._spread(request, clients)
        connected = time.monotonic()
        before = meter.read() if meter else None
        execute_run.apply_async(args=[run_id], queue=self.env.queue)
        answers = self._results(procs)
        if clients >= 100:
            log(
                f"dex_{clients}: connected with snapshots in {connected - t0:.1f} s, "
                f"last client done {time.monotonic() - connected:.1f} s after the enqueue"
            )
        if meter and cpu is not None:
            cpu.append(meter.delta(before, meter.read()))
        deadline = time.monotonic() + ROUND_TIMEOUT
        while Run.objects.values_list("status", flat=True).get(pk=run_id) != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the realtime run {run_id} did not complete")
            time.sleep(0.05)
        keys = {str(pk): key for pk, key in Step.objects.filter(run_id=run_id).values_list("id", "key")}
        committed = self._commits(run_id)
        if len(committed) != STEPS:
            raise RuntimeError(f"the commit ledger has {len(committed)} of {STEPS} steps of {run_id}")
        latencies: list[float] = []
        lost = 0
        for answer in answers:
            for arrived in answer["arrivals"]:
                seen = {keys[pk]: at for pk, at in arrived.items() if pk in keys}
                lost += STEPS - len(seen)
                latencies.extend((at - committed[key]) * 1000 for key, at in seen.items())
        return latencies, lost

    def _commits(self, run_id: str) -> dict[str, float]:
        out = {}
        for line in self.ledger.read_text().splitlines():
            rid, key, at = line.split("\t")
            if rid == run_id:
                out.setdefault(key, float(at))
        return out

    # -- the baseline: raw Redis PUBLISH → SUBSCRIBE ---------------------------------------------------------
    def redis_round(self, subscribers: int) -> tuple[list[float], int]:
        import redis

        channel = f"dexbench:{self.env.session}:rt:{uuid.uuid4().hex}"
        request = {"op": "redis", "url": self.env.redis_url, "channel": channel, "expect": STEPS}
        procs = self._spread(request, subscribers)

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
        answers = self._results(procs)
        thread.join(timeout=10)
        return [x for a in answers for x in a["latencies_ms"]], sum(int(a["lost"]) for a in answers)
