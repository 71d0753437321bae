"""throughput: N = 1, 10, 100 concurrent 10-step runs, the same worker concurrency for every engine.

At each N, three variants run alternately (dex, dbos, celery_chain, dex, …) after a warm-up, 5 repeats:
  dex           N runs of the bench's 10 no-op step task triggered through `services.run_trigger`, executed by
                one real Celery worker process with WORKER_CONCURRENCY prefork children (bench/agents.py)
  dbos          N DBOS Transact workflows of 10 steps on the same Postgres, WORKER_CONCURRENCY at a time
                (a thread pool in the bench process: DBOS executes workflows in its caller's process)
  celery_chain  N Celery chains of 10 tasks on the same worker (no durability: the peer Dex replaces)
A round starts its N runs at once and ends when the last one signalled completion (bench/agents.py: one RPUSH
per run, BLPOPped here). A variant's figure per repeat is the median of its rounds; steps/s = N·10 / round
time; ratios (dex steps/s over the peer's) are paired per repeat, reported as median with min–max.
`run_p99_ms_nN`: the p99 over every measured Dex run of (its completion signal − its round's start).
Lost runs: Dex runs not `completed` in Postgres at the end, and runs of any variant whose completion signal
never came within DONE_TIMEOUT (a round does not fail on them: they are counted).
With --tiny, the largest N is 20 (the figures keep the `_n100` names; `sizes` says what ran).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.harness import BenchEnv, Sizes, Variant, alternate, goal_met, log, rounded, spread
from bench.scenarios.step_overhead import _flush_publisher, _launch_dbos, _reset

NAME = "throughput"
STEPS = 10
WORKER_CONCURRENCY = 4
LEVELS = {"full": (1, 10, 100), "quick": (1, 10, 100), "tiny": (1, 10, 20)}
GOAL = {"ratio_vs_dbos_n100": ">= 2.0", "ratio_vs_celery_chain_n100": ">= 1.0", "lost_runs": "== 0"}
DONE_TIMEOUT = 120.0


def _level_sizes(sizes: Sizes, n: int) -> Sizes:
    """Fewer rounds as N grows, so each level measures a comparable number of steps."""
    if sizes.name == "tiny":
        return dataclasses.replace(sizes, warmup_rounds=1 if n == 1 else 0, repeats=1, rounds=1)
    per = {"full": {1: 20, 10: 6, 100: 2}, "quick": {1: 6, 10: 2, 100: 1}}[sizes.name]
    # The smaller levels ran just before on the same worker and pools: --quick needs no warm-up round at N=100.
    warm = {"full": {1: 5, 10: 2, 100: 1}, "quick": {1: 2, 10: 1, 100: 0}}[sizes.name]
    return dataclasses.replace(sizes, rounds=per.get(n, 1), warmup_rounds=warm.get(n, 1))


def run(env: BenchEnv) -> dict:
    import redis

    started = time.monotonic()
    _reset(env)
    client = redis.Redis.from_url(env.redis_url)
    with ThreadPoolExecutor(1) as starter:  # the worker starts while DBOS launches here
        worker = starter.submit(env.start_worker, concurrency=WORKER_CONCURRENCY, name="throughput")
        _launch_dbos(env)
        worker.result()
    pool = ThreadPoolExecutor(max_workers=WORKER_CONCURRENCY, thread_name_prefix="bench-dbos")
    env.stack.callback(pool.shutdown)

    levels = LEVELS[env.sizes.name]
    series: dict[str, list[float]] = {}
    figures: dict[str, Any] = {}
    variants_out: dict[str, Any] = {}
    lost: dict[str, int] = {"dex": 0, "dbos": 0, "celery_chain": 0}
    for n in levels:
        label = "n100" if n == levels[-1] else f"n{n}"
        sizes = _level_sizes(env.sizes, n)
        log(f"N = {n} concurrent runs ({label}); {sizes.repeats} repeats of {sizes.rounds} round(s)")
        latencies: dict[str, list[list[float]]] = {"dex": [], "dbos": [], "celery_chain": []}
        variants = _variants(env, client, pool, n, latencies, lost)
        alt = alternate(variants, sizes)
        ms = {v.name: alt.ms_per_step(v) for v in variants}
        series[f"steps_per_s_{label}"] = [1000 / x for x in ms["dex"]]
        series[f"ratio_vs_dbos_{label}"] = [d / x for x, d in zip(ms["dex"], ms["dbos"], strict=True)]
        series[f"ratio_vs_celery_chain_{label}"] = [c / x for x, c in zip(ms["dex"], ms["celery_chain"], strict=True)]
        series[f"dbos_steps_per_s_{label}"] = [1000 / x for x in ms["dbos"]]
        series[f"celery_chain_steps_per_s_{label}"] = [1000 / x for x in ms["celery_chain"]]
        for name, rounds in latencies.items():
            measured = [x for r in rounds[sizes.warmup_rounds :] for x in r]
            if measured:
                key = f"run_p99_ms_{label}" if name == "dex" else f"{name}_run_p99_ms_{label}"
                figures[key] = _pct(measured, 99)
        variants_out[label] = {
            "concurrent_runs": n,
            "ms_per_step": {name: spread(values) for name, values in ms.items()},
            "sizes": sizes.as_dict(),
        }
    _check_dex_runs(lost)
    spreads = {name: spread(values) for name, values in series.items()}
    figures.update({name: s["median"] for name, s in spreads.items()})
    figures["lost_runs"] = lost["dex"]
    figures["lost_runs_peers"] = lost["dbos"] + lost["celery_chain"]
    goals_met = {name: goal_met(figures.get(name), goal) for name, goal in GOAL.items()}
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": all(goals_met.values()),
            "goals_met": goals_met,
            "ranges": {name: [s["min"], s["max"]] for name, s in spreads.items()},
            "per_repeat": series,
            "levels": variants_out,
            "sizes": {"levels": list(levels), "worker_concurrency": WORKER_CONCURRENCY, "steps": STEPS},
            "seconds": time.monotonic() - started,
            "method": (
                "per N, variants alternate dex, dbos, celery_chain after a warm-up; a round starts N runs at once "
                "and ends at the last completion signal; per repeat a variant's figure is the median of its "
                "rounds; ratios = dex steps/s / peer steps/s, paired per repeat, median with min-max (`ranges`). "
                f"Dex and Celery run on one worker process with {WORKER_CONCURRENCY} prefork children; DBOS runs "
                f"{WORKER_CONCURRENCY} workflows at a time on a thread pool in the bench process."
            ),
        }
    )


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def _variants(
    env: BenchEnv, client: Any, pool: ThreadPoolExecutor, n: int, latencies: dict, lost: dict[str, int]
) -> list[Variant]:
    from celery import chain

    from bench.agents import NOOP_TASK_ID, done_key, noop_link
    from bench.dbos_app import dbos_noop_workflow
    from runs import services

    def wait_all(name: str, tokens: list[str], t0: float) -> None:
        """BLPOP every run's completion signal; the latency of each from the round's start."""
        keys = {done_key(t): t for t in tokens}
        seen: list[float] = []
        deadline = time.monotonic() + DONE_TIMEOUT
        while keys:
            # Short BLPOPs: the Redis client's socket timeout (5 s by default) must outlast each one.
            got = client.blpop(list(keys), timeout=2)
            if got is None:
                if time.monotonic() < deadline:
                    continue
                log(f"{name}: {len(keys)} of {len(tokens)} runs gave no completion signal in {DONE_TIMEOUT:.0f} s")
                lost[name] += len(keys)
                break
            keys.pop(got[0].decode())
            seen.append((time.perf_counter() - t0) * 1000)
        latencies[name].append(seen)

    def dex(_: None) -> None:
        t0 = time.perf_counter()
        tokens = []
        for _i in range(n):
            run, _created = services.run_trigger(task_id=NOOP_TASK_ID, payload={"steps": STEPS})
            tokens.append(f"dex:{run.id}")
        wait_all("dex", tokens, t0)

    def chain_prepare() -> list[tuple[str, Any]]:
        _flush_publisher()
        out = []
        for _i in range(n):
            tok = uuid.uuid4().hex
            out.append((tok, chain(*(noop_link.si(tok, i, STEPS) for i in range(STEPS)))))
        return out

    def celery_chain(state: list[tuple[str, Any]]) -> None:
        t0 = time.perf_counter()
        for _tok, signature in state:
            signature.apply_async()
        wait_all("celery_chain", [tok for tok, _ in state], t0)

    def dbos(_: None) -> None:
        t0 = time.perf_counter()
        done: list[float] = []

        def one() -> int:
            value = dbos_noop_workflow(STEPS)
            done.append((time.perf_counter() - t0) * 1000)
            return value

        futures = [pool.submit(one) for _ in range(n)]
        for future in futures:
            try:
                if future.result(timeout=DONE_TIMEOUT) != sum(range(STEPS)):
                    lost["dbos"] += 1
            except Exception as exc:  # a workflow that failed or hung is lost, not a crash of the bench
                log(f"dbos: a workflow failed: {exc!r}")
                lost["dbos"] += 1
        latencies["dbos"].append(done)

    steps = n * STEPS
    return [
        Variant("dex", steps, dex, prepare=_flush_publisher),
        Variant("dbos", steps, dbos, prepare=_flush_publisher),
        Variant("celery_chain", steps, celery_chain, prepare=chain_prepare),
    ]


def _check_dex_runs(lost: dict[str, int]) -> None:
    """Every Dex run triggered must end completed in Postgres (the record), signals aside."""
    from bench.agents import NOOP_TASK_ID
    from runs.models import Run, RunStatus

    deadline = time.monotonic() + 30
    while True:
        pending = Run.objects.filter(task_id=NOOP_TASK_ID).exclude(status=RunStatus.COMPLETED).count()
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if pending:
        log(f"{pending} Dex runs did not complete")
    lost["dex"] = max(lost["dex"], pending)
    total = Run.objects.filter(task_id=NOOP_TASK_ID).count()
    log(f"{total} Dex runs in all, {pending} not completed")
