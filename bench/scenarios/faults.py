"""faults: the fault table of the reliability claim, at full counts (the CI subset is tests/faults).

Each fault runs against real processes this scenario starts (Celery workers, the scheduler, daphne) and real
servers — the bench's Postgres and Redis, plus a private Redis and a private Postgres that are stopped and
restarted (never the shared servers). Figures come from the database and from an external ledger the steps
append to outside the engine's transaction (bench.faultkit), so a re-execution can't hide:

  completed_fraction            runs completed / runs started, over the SIGKILL, Redis, Postgres, racing runs
  reexecuted_committed_steps    executions of a step after its commit — the promise is 0
  inflight_reruns / faults      re-executions of steps in flight when a fault hit, against the faults injected
  stuck_runs                    runs not terminal at the end
  recovery_s_*                  SIGKILL → the killed run's next step execution (lease DEX_LEASE_SECONDS = 2 s)
  redis_*                       triggers through the HTTP API while Redis is down: all accepted, all completed
  daphne_missed_events          completed steps a reconnecting stream client never learned of
  poison_*                      a run that kills its worker each time ends failed after DEX_MAX_RECOVERIES
Counts, not timings (except recovery and drain seconds): one pass per fault.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.harness import BenchEnv, goal_met, log

NAME = "faults"
GOAL = {
    "reexecuted_committed_steps": "== 0",
    "stuck_runs": "== 0",
    "completed_fraction": "== 1",
    "inflight_reruns_per_fault": "<= 1",
    "daphne_missed_events": "== 0",
    "redis_triggers_rejected": "== 0",
    "poison_dead_lettered": "== 1",
    "late_result_rejected": "== 1",
}

# How each fault is named in the README's reliability table.
LABELS = {
    "sigkill": "SIGKILL of the process executing a step",
    "duplicates": "duplicate deliveries to 2 racing workers",
    "redis": "Redis down (triggers keep arriving)",
    "postgres": "Postgres restarted mid-run",
    "daphne": "daphne restarted under SSE + websocket clients",
    "poison": "poison run (kills its worker every time)",
    "late": "step result after its timeout",
}

COUNTS = {
    #        sigkills, sigkill runs, redis down s, redis triggers, pg restarts, daphne restarts, duplicate copies
    "full": (20, 10, 30.0, 30, 3, 3, 5),
    "quick": (5, 4, 10.0, 10, 1, 1, 3),
    "tiny": (2, 2, 3.0, 3, 1, 1, 2),
}

# What the fault processes run with: a short lease, so a dead worker's run is recovered in seconds.
FAULT_ENV = {
    "DEX_LEASE_SECONDS": "2",
    "DEX_SCHEDULER_TICK_SECONDS": "0.1",
    "DEX_REQUEUE_STALE_SECONDS": "5",
    "DEX_CONN_MAX_AGE": "0",
    "DEX_LOG_LEVEL": "INFO",  # the "ready" lines the harness waits for
}


def run(env: BenchEnv) -> dict:
    import bench.faultcases as fc
    import bench.faultkit as fk
    from dexweb.settings import celery_url_from_redis
    from runs import services
    from runs.ops.audit import Actor

    started = time.monotonic()
    sigkills, sigkill_runs, redis_down, redis_triggers, pg_restarts, daphne_restarts, copies = COUNTS.get(
        env.sizes.name, COUNTS["quick"]
    )
    base_env = {**os.environ, **FAULT_ENV}
    workdir: Path = env.workdir
    _key, secret = services.apikey_create(name=f"faults-{env.session}", by=Actor.system("bench"))
    n = 0

    def cluster(**overrides: str) -> fk.Cluster:
        nonlocal n
        n += 1
        c = fk.Cluster({**base_env, **overrides}, workdir, tag=f"{env.session}-{n}")
        env.stack.callback(c.stop_all)
        return c

    def ledger(name: str) -> Path:
        return workdir / f"ledger-{name}.txt"

    results: dict[str, dict] = {}

    log(f"faults: SIGKILL a worker mid-step {sigkills}× over {sigkill_runs} runs")
    c = cluster()
    sig = fc.sigkill_workers(c, ledger("sigkill"), runs=sigkill_runs, faults=sigkills, steps=10, pause=0.3, timeout=300)
    c.stop_all()
    results["sigkill"] = sig.as_dict()
    log(f"  {results['sigkill']}")

    log("faults: duplicate deliveries to two racing workers")
    c = cluster()
    dup = fc.duplicate_deliveries(c, ledger("dup"), runs=5, copies=copies)
    c.stop_all()
    results["duplicates"] = dup.as_dict()

    log(f"faults: Redis down {redis_down:g} s while {redis_triggers} triggers arrive")
    redis = fk.PrivateRedis()
    redis.start()
    env.stack.callback(redis.destroy)
    c = cluster(REDIS_URL=redis.url, CELERY_BROKER_URL=celery_url_from_redis(redis.url))
    results["redis"] = fc.redis_outage(
        c, redis, ledger("redis"), secret=secret, down_seconds=redis_down, triggers=redis_triggers, timeout=300
    )
    c.stop_all()
    log(f"  {results['redis']}")

    log(f"faults: Postgres restarted {pg_restarts}× mid-run")
    postgres = fk.PrivatePostgres()
    postgres.start()
    env.stack.callback(postgres.destroy)
    c = cluster(DATABASE_URL=postgres.url("dex_faults"))
    fk.migrate(c.env)
    results["postgres"] = fc.postgres_restart(
        c, postgres, ledger("pg"), runs=4, restarts=pg_restarts, steps=10, pause=0.3, timeout=300
    )
    c.stop_all()
    log(f"  {results['postgres']}")

    log(f"faults: daphne restarted {daphne_restarts}× under a connected stream client")
    c = cluster()
    results["daphne"] = fc.daphne_restart(
        c, ledger("daphne"), secret=secret, restarts=daphne_restarts, steps=12 * (daphne_restarts + 1), pause=0.5
    )
    c.stop_all()
    log(f"  {results['daphne']}")

    log("faults: a poison run, a late step result")
    c = cluster()
    results["poison"] = fc.poison_run(c, ledger("poison"), max_recoveries=5)
    c.stop_all()
    c = cluster()
    results["late"] = fc.late_result(c, ledger("late"))
    c.stop_all()

    counted = [results[k] for k in ("sigkill", "duplicates", "redis", "postgres")]
    runs_total = sum(r["runs"] for r in counted)
    faults_total = sum(r["faults"] for r in counted)
    inflight = sum(r["inflight_reruns"] for r in counted)
    figures = {
        "runs": runs_total,
        "completed": sum(r["completed"] for r in counted),
        "completed_fraction": round(sum(r["completed"] for r in counted) / runs_total, 4) if runs_total else 0,
        "reexecuted_committed_steps": sum(r["reexecuted_committed_steps"] for r in counted),
        "inflight_reruns": inflight,
        "faults_injected": faults_total,
        "inflight_reruns_per_fault": round(inflight / faults_total, 3) if faults_total else 0,
        "stuck_runs": sum(r["stuck_runs"] for r in results.values()),
        "missing_steps": sum(r["missing_steps"] for r in counted),
        "sigkills": sig.faults,
        "recovery_s_median": results["sigkill"].get("recovery_s_median"),
        "recovery_s_max": results["sigkill"].get("recovery_s_max"),
        "redis_down_s": results["redis"]["down_s"],
        "redis_triggers": results["redis"]["triggers"],
        "redis_triggers_rejected": results["redis"]["triggers"] - results["redis"]["accepted"],
        "redis_drain_s": results["redis"]["drain_s_after_redis_back"],
        "postgres_restarts": results["postgres"]["restarts"],
        "daphne_restarts": results["daphne"]["daphne_restarts"],
        "daphne_missed_events": results["daphne"]["missed_events"],
        "poison_dead_lettered": int(
            results["poison"]["status"] == "failed" and results["poison"]["error_type"] == "WorkerLost"
        ),
        "poison_executions": results["poison"]["poison_executions"],
        "late_result_rejected": int(results["late"]["output"] == "on time" and results["late"]["attempts"] == 2),
    }
    figures = {k: (v if v is not None else -1) for k, v in figures.items()}
    goals_met = {name: goal_met(figures[name], goal) for name, goal in GOAL.items()}
    return {
        "figures": figures,
        "goal": GOAL,
        "met": all(goals_met.values()),
        "goals_met": goals_met,
        "detail": {LABELS[key]: value for key, value in results.items()},
        "seconds": round(time.monotonic() - started, 1),
        "note": (
            "Real worker/scheduler/daphne processes; Redis and Postgres outages use private servers started by "
            "the scenario. Lease 2 s, scheduler tick 0.1 s, lost wake-ups re-sent after 5 s. Postgres faults "
            "count one per run executing when it went down (worker concurrency 2)."
        ),
    }
