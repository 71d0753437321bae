"""step_overhead: what a durable step costs, next to the alternatives, on the same machine in the same run.

The same 10 no-op steps as
  celery_one_task        one Celery task doing all 10 (no durability, one broker hop)
  celery_chain           a Celery chain of 10 tasks on a worker with Dex's settings (acks_late, prefetch 1)
  celery_chain_defaults  the same chain on a worker with Celery's defaults (ack on receipt, prefetch 4)
  dex                    a Dex run through a real Celery worker process: trigger → completed, end to end
  dex_inprocess          the engine alone: `runs.engine.run_execute` (claim + 10 steps + settle) in this process
  dex_nopublish          the same with realtime publishing switched off (shows what publishing costs the engine)
  dbos                   a DBOS Transact workflow of 10 steps on the same Postgres (its own system database), in a
                         DBOS process of its own (one, as Dex has one worker process here)
  restate, temporal_*    the peers (bench/peerkit.py), one SDK/worker process each, when they can run here
  commit_floor           10 one-row INSERTs in autocommit, prepared (the physical floor of a durable step)
  dex_traced, dex_inprocess_traced   with DEX_BENCH_OTEL=on: dex and dex_inprocess with OpenTelemetry tracing on
                         (runs.integrations.otel), exporting over OTLP/HTTP to a receiver on loopback; the traced
                         worker is a second worker process on a queue of its own
Worker-based variants signal completion the same way (one RPUSH the bench BLPOPs; bench/agents.py).

Write commits are counted where they become durable: the COMMIT records a round wrote to the WAL, read with
the server's pg_waldump (where the WAL can't be read, the transaction-id counter, which also counts savepoints'
subtransactions) — end to end around every `dex` round (trigger, claim, steps, settle: the goal figure), and
around in-process runs of 10 and of 0 steps (the steady-state, marginal figure). The server may be shared, so
minima are reported (other sessions can only add to a delta). CPU seconds are summed over every
process a Dex run touches (the trigger in this process, the worker, all of Postgres's processes, Redis).
`pgbench -M prepared -c 1` of the same one-row INSERT measures the floor's rate between repeats.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import statistics
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import peerkit
from bench.harness import (
    BenchEnv,
    CpuMeter,
    Variant,
    alternate,
    judge,
    rounded,
    spread,
    url_host,
)
from bench.measure import WalCommits, force_stats_flush, log
from bench.peerkit import NOT_RUNNABLE, DbosProcesses, Peer, start_peers

NAME = "step_overhead"
STEPS = 10
GOAL = {
    "ratio_vs_dbos": "<= 0.5",
    "ratio_inprocess_vs_dbos": "<= 0.3",
    "ratio_vs_restate": "<= 1.0",
    "ratio_vs_celery_chain": "<= 0.5",
    "ratio_inprocess_vs_commit_floor": "<= 3",
    "write_commits_per_step": "<= 1.2",
    "write_commits_per_step_marginal": "<= 1.0",
    "cpu_ms_per_step": "<= 1.2",
}
DONE_TIMEOUT = 60.0


def run(env: BenchEnv) -> dict:
    import psycopg
    import redis

    started = time.monotonic()
    _reset(env)
    client = redis.Redis.from_url(env.redis_url)
    wal = WalCommits.create(env.probe)
    if wal is None:
        log("pg_waldump can't read this server's WAL: write commits are counted from the xid counter")
    counts = _count_dex_commits(env, wal)
    pgbench = Pgbench.create(env)
    with ThreadPoolExecutor(3) as starting:  # each takes seconds to start on a busy box: side by side
        worker = starting.submit(env.start_worker)
        defaults = starting.submit(env.start_celery_defaults_worker)
        dbos = starting.submit(lambda: DbosProcesses(env, 1).start())
        peers, skipped = start_peers(env, processes=1, tag="seq")
        worker, dbos = worker.result(), dbos.result()
        defaults.result()
    floor_conn = psycopg.connect(env.database_url, autocommit=True)
    env.stack.callback(floor_conn.close)

    e2e_runs: list[tuple] = []  # (run id, trigger called, trigger returned, completion seen), wall clock
    variants = _variants(env, client, floor_conn, e2e_runs, dbos, peers)
    sink = _traced_variants(env, variants, client) if _otel_requested() else None
    meter = CpuMeter(env, worker=worker, databases=[env.database_name, env.dbos_database_name], redis=client)
    tps: list[float | None] = []

    def between_repeats(r: int) -> None:
        tps.append(pgbench.run(env.sizes.pgbench_seconds) if pgbench else None)
        meter.refresh()

    alt = alternate(
        variants,
        env.sizes,
        xid_probe=env.probe.next_xid,
        wal_probe=env.probe.wal_lsn if wal else None,
        cpu_meter=meter,
        between_repeats=between_repeats,
    )
    by_name = {v.name: v for v in variants}
    ms = {v.name: alt.ms_per_step(v) for v in variants}

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(ms[a], ms[b], strict=True)]

    series: dict[str, list[float]] = {
        "dex_ms_per_step": ms["dex"],
        "ratio_vs_celery_chain": ratio("dex", "celery_chain"),
        "ratio_vs_celery_chain_defaults": ratio("dex", "celery_chain_defaults"),
        "ratio_vs_dbos": ratio("dex", "dbos"),
        "ratio_vs_commit_floor": ratio("dex", "commit_floor"),
        "ratio_vs_celery_one_task": ratio("dex", "celery_one_task"),
        "dex_inprocess_ms_per_step": ms["dex_inprocess"],
        "ratio_inprocess_vs_dbos": ratio("dex_inprocess", "dbos"),
        "ratio_inprocess_vs_commit_floor": ratio("dex_inprocess", "commit_floor"),
        "publish_share_inprocess": [1 - n / p for n, p in zip(ms["dex_nopublish"], ms["dex_inprocess"], strict=True)],
        "celery_one_task_ms_per_step": ms["celery_one_task"],
        "celery_chain_ms_per_step": ms["celery_chain"],
        "celery_chain_defaults_ms_per_step": ms["celery_chain_defaults"],
        "dbos_ms_per_step": ms["dbos"],
        "commit_floor_ms": ms["commit_floor"],
    }
    for name in peers:
        series[f"{name}_ms_per_step"] = ms[name]
        # A peer run in fewer repeats is paired with Dex's rounds of the same repeats.
        series[f"ratio_vs_{name}"] = [x / y for x, y in zip(ms["dex"], ms[name], strict=False)]
    if all(t for t in tps):
        series["pgbench_floor_tps"] = [float(t) for t in tps if t]
        series["fraction_of_pgbench_floor"] = [1000 / d / t for d, t in zip(ms["dex"], tps, strict=True) if t]
        series["fraction_of_pgbench_floor_inprocess"] = [
            1000 / d / t for d, t in zip(ms["dex_inprocess"], tps, strict=True) if t
        ]
    if sink is not None:
        series["dex_traced_ms_per_step"] = ms["dex_traced"]
        series["ratio_traced_vs_dex"] = ratio("dex_traced", "dex")
        series["dex_inprocess_traced_ms_per_step"] = ms["dex_inprocess_traced"]
        series["ratio_inprocess_traced_vs_inprocess"] = ratio("dex_inprocess_traced", "dex_inprocess")
    spreads = {name: spread(values) for name, values in series.items()}
    figures: dict[str, Any] = {name: s["median"] for name, s in spreads.items()}
    figures.update({k: v for k, v in counts.items() if not isinstance(v, dict)})
    for name in ("dex", "dbos"):
        xids = [s.xids for s in alt.all(name) if s.xids is not None]
        if xids:  # transaction ids, subtransactions (savepoints) included
            figures[f"{name}_xids_per_run_min"] = min(xids)
        commits = [c for s in alt.all(name) if s.wal for c in [wal.count(*s.wal)] if c is not None] if wal else []
        commits = commits or xids  # without pg_waldump, the xid counter stands in
        if commits:
            figures[f"{name}_write_commits_per_run_min"] = min(commits)
            figures[f"{name}_write_commits_per_run_median"] = statistics.median(commits)
            prefix = "" if name == "dex" else f"{name}_"
            # End to end, everything counted: the trigger's commit, the claim, the steps, the settle.
            figures[f"{prefix}write_commits_per_step"] = min(commits) / STEPS
    cpu = {v.name: _cpu_per_step(alt.all(v.name), v.steps) for v in variants}
    if cpu["dex"]:
        figures["cpu_ms_per_step"] = cpu["dex"]["total"]
    if sink is not None:
        figures["spans_exported"] = sink.spans
    goals_met, met = judge(figures, GOAL)
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": met,
            "goals_met": goals_met,
            "skipped_peers": skipped,
            "not_runnable_peers": NOT_RUNNABLE,
            "versions": peerkit.last_versions,
            "ranges": {name: [s["min"], s["max"]] for name, s in spreads.items()},
            "per_repeat": series,
            "variants": {
                name: {
                    "ms_per_step": spread(ms[name]),
                    "cpu_ms_per_step": cpu[name],
                    "steps": by_name[name].steps,
                }
                for name in ms
            },
            "dex_e2e_phases_ms": _phases(e2e_runs[env.sizes.warmup_rounds :]),
            "write_commits": counts.get("_detail"),
            "write_commits_counted_from": "WAL COMMIT records (pg_waldump)" if wal else "the xid counter",
            "sizes": {**env.sizes.as_dict(), "steps": STEPS},
            "seconds": time.monotonic() - started,
            "missed_because": (
                "a Dex run pays a fixed cost (the trigger's commit, the broker hop, the claim, the settle; "
                "`dex_e2e_phases_ms`) that its 10 no-op steps share, and Python per step (memoisation, encoding, "
                "the realtime publish) on a 2-core box. A whole 10-step run writes 13 commits: the trigger's (the "
                "run exists before the 201), the claim's (no step runs before the run is visibly owned) and the "
                "settle's (its result is durable before anyone is told) beside one per step, so short runs stay "
                "above 1.2 per step while the steady state is 1.0."
            ),
            "method": (
                "variants alternate A,B,C,... per round after a warm-up; per repeat a variant's figure is the "
                "median of its rounds; ratios are paired per repeat and reported as median with min-max "
                "(`ranges`). dex_ms_per_step and ratio_vs_* use the end-to-end Dex run (trigger -> completed "
                "through a Celery worker); *_inprocess figures use run_execute in the bench process. Every engine "
                "gets one worker process (DBOS: one DBOS process; Restate: one hypercorn worker; Temporal: one "
                "worker process). write_commits_per_step = min over the end-to-end dex rounds of the COMMIT "
                "records the round wrote to the WAL (pg_waldump; the xid counter where the WAL can't be read, "
                "which also counts savepoints' subtransactions: *_xids_per_run_min) / steps (trigger + claim + "
                "steps + settle); *_marginal = (10-step run - 0-step run) / 10 in process (the steady state); "
                "*_inprocess = a whole in-process run / 10. cpu_ms_per_step (end "
                "to end) sums this process (the trigger), the worker's processes, every Postgres server process "
                "(and backends that exited in the window: the postmaster's reaped-children time) and Redis (INFO); "
                "an unwatched run costs daphne nothing (its events reach no consumer), see realtime for a watched "
                "one. commit_floor = a prepared one-row INSERT in autocommit; pgbench_floor_tps the same with "
                "pgbench -M prepared -c 1."
            ),
        }
    )


# --- setup ------------------------------------------------------------------------------------------------------


def _reset(env: BenchEnv) -> None:
    """Empty the bench databases (they are the benchmark's own) so results don't drift as they fill."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE runs_run CASCADE")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit_floor"
            " (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("TRUNCATE bench_commit_floor")
    import psycopg

    with psycopg.connect(env.dbos_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('dbos.workflow_status')").fetchone()[0]:
            conn.execute("TRUNCATE dbos.workflow_status CASCADE")


def _new_run(env: BenchEnv, steps: int) -> str:
    """A queued run of the bench task, created the way runs.testing does (no enqueue)."""
    from django.utils import timezone

    from bench.agents import NOOP_TASK_ID
    from runs.models import Run

    run = Run.objects.create(
        task_id=NOOP_TASK_ID, payload={"steps": steps}, queue=env.queue, enqueued_at=timezone.now()
    )
    return str(run.id)


@contextlib.contextmanager
def _publishing_off():
    from runs import realtime

    original = realtime.publish_now
    realtime.publish_now = lambda *args, **kwargs: None
    try:
        yield
    finally:
        realtime.publish_now = original


def _flush_publisher() -> None:
    """Let this process's publisher thread drain, so its Redis work isn't billed to the next variant."""
    from runs import realtime

    publisher = getattr(realtime, "_publisher", None)
    if publisher is not None and hasattr(publisher, "flush"):
        publisher.flush()


# --- the variants -------------------------------------------------------------------------------------------------


def _variants(
    env: BenchEnv, client: Any, floor_conn: Any, e2e_runs: list, dbos: DbosProcesses, peers: dict[str, Peer]
) -> list[Variant]:
    from celery import chain

    from bench.agents import NOOP_TASK_ID, done_key, noop_all, noop_link, noop_link_defaults
    from runs import engine, services
    from runs.models import Run, RunStatus

    def wait_done(token: str) -> None:
        if client.blpop([done_key(token)], timeout=DONE_TIMEOUT) is None:
            raise RuntimeError(f"no completion signal for {token} within {DONE_TIMEOUT}s")

    def token() -> str:
        _flush_publisher()
        return uuid.uuid4().hex

    # 1. Celery: one task doing every step.
    def celery_one_task(tok: str) -> None:
        noop_all.apply_async((tok, STEPS))
        wait_done(tok)

    # 2. Celery: a chain of one task per step (the signatures are built untimed), with Dex's settings and with
    # Celery's defaults (another worker, its own queue).
    def chain_prepare() -> tuple[str, Any]:
        tok = token()
        return tok, chain(*(noop_link.si(tok, i, STEPS) for i in range(STEPS)))

    def chain_defaults_prepare() -> tuple[str, Any]:
        tok = token()
        queue = env.celery_defaults_queue
        return tok, chain(*(noop_link_defaults.si(tok, i, STEPS).set(queue=queue) for i in range(STEPS)))

    def celery_chain(state: tuple[str, Any]) -> None:
        tok, signature = state
        signature.apply_async()
        wait_done(tok)

    # 3. Dex end to end: trigger → the worker claims, runs 10 steps, settles → completion signal.
    def dex(_: None) -> None:
        started = time.time()
        run, _created = services.run_trigger(task_id=NOOP_TASK_ID, payload={"steps": STEPS})
        triggered = time.time()
        wait_done(f"dex:{run.id}")
        e2e_runs.append((run.id, started, triggered, time.time()))

    def dex_inprocess_prepare() -> str:
        _flush_publisher()
        return _new_run(env, STEPS)

    def dex_inprocess(run_id: str) -> None:
        status = engine.run_execute(run_id)
        if status != RunStatus.COMPLETED:
            raise RuntimeError(f"in-process run {run_id} ended {status}")

    def dex_nopublish(run_id: str) -> None:
        with _publishing_off():
            dex_inprocess(run_id)

    # 4. DBOS Transact and the peers, each in processes of its own.
    def external(runner: DbosProcesses | Peer, name: str):
        def run_one(_: None) -> None:
            _latencies, failed = runner.run(1, STEPS)
            if failed:
                raise RuntimeError(f"a {name} workflow failed (see its log)")

        return run_one

    # 5. The floor: a prepared one-row INSERT in autocommit, once per step.
    def commit_floor(_: None) -> None:
        for _ in range(STEPS):
            floor_conn.execute(FLOOR_SQL, prepare=True)

    def dex_check() -> None:
        bad = Run.objects.filter(task_id=NOOP_TASK_ID).exclude(status=RunStatus.COMPLETED).count()
        if bad:
            raise RuntimeError(f"{bad} bench runs did not complete")

    return [
        Variant("celery_one_task", STEPS, celery_one_task, prepare=token),
        Variant("celery_chain", STEPS, celery_chain, prepare=chain_prepare),
        Variant("celery_chain_defaults", STEPS, celery_chain, prepare=chain_defaults_prepare),
        Variant("dex", STEPS, dex, prepare=_flush_publisher, check=dex_check),
        Variant("dex_inprocess", STEPS, dex_inprocess, prepare=dex_inprocess_prepare),
        Variant("dex_nopublish", STEPS, dex_nopublish, prepare=dex_inprocess_prepare),
        Variant("dbos", STEPS, external(dbos, "DBOS"), prepare=_flush_publisher),
        *(
            Variant(name, STEPS, external(peer, name), prepare=_flush_publisher, repeats=_peer_repeats(env, name))
            for name, peer in peers.items()
        ),
        Variant("commit_floor", STEPS, commit_floor, prepare=_flush_publisher),
    ]


def _otel_requested() -> bool:
    import os

    return os.environ.get("DEX_BENCH_OTEL", "").lower() in ("1", "on", "true", "yes")


def _traced_variants(env: BenchEnv, variants: list[Variant], client: Any) -> Any:
    """dex and dex_inprocess again with tracing on, alternating with the untraced ones (BENCH.md: A, B, A, B):
    the bench process's tracer is registered only around a traced round; the traced worker has the OTEL_*
    variables. Both export to one loopback receiver. Returns it (it counts the spans)."""
    from django.test import override_settings
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from bench.agents import NOOP_TASK_ID, done_key
    from bench.otlp_sink import OtlpSink
    from runs import services
    from runs.engine import hooks
    from runs.integrations.otel import DexTracer

    sink = OtlpSink()
    env.stack.callback(sink.stop)
    provider = TracerProvider(resource=Resource.create({"service.name": "dex-bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink.url}/v1/traces")))
    env.stack.callback(provider.shutdown)
    tracer = DexTracer(provider.get_tracer("dex"))
    queue = f"{env.queue}-traced"
    env.start_worker(
        name="traced",
        queue=queue,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_SERVICE_NAME": "dex-bench-worker"},
    )

    @contextlib.contextmanager
    def traced():
        hooks.set_tracer(tracer)
        try:
            yield
        finally:
            hooks.set_tracer(None)

    def dex_traced(_: None) -> None:
        with traced(), override_settings(DEX_DEFAULT_QUEUE=queue):
            run, _created = services.run_trigger(task_id=NOOP_TASK_ID, payload={"steps": STEPS})
        if client.blpop([done_key(f"dex:{run.id}")], timeout=DONE_TIMEOUT) is None:
            raise RuntimeError(f"no completion signal for the traced run {run.id} within {DONE_TIMEOUT}s")

    by_name = {v.name: v for v in variants}
    inprocess = by_name["dex_inprocess"]

    def dex_inprocess_traced(run_id: str) -> None:
        with traced():
            inprocess.run(run_id)

    at = variants.index(by_name["dex_nopublish"]) + 1
    variants[at:at] = [
        Variant("dex_traced", STEPS, dex_traced, prepare=_flush_publisher),
        Variant("dex_inprocess_traced", STEPS, dex_inprocess_traced, prepare=inprocess.prepare),
    ]
    return sink


def _peer_repeats(env: BenchEnv, name: str) -> int | None:
    """Temporal's activities take ~25 ms a step on its dev server: with --quick (no goal rides on them) they run
    in the first 2 repeats (16 rounds); Restate, whose figure has a goal, runs in all 5."""
    slow = name in ("temporal_activities", "temporal_tuned")
    return 2 if slow and env.sizes.name == "quick" else None


def _phases(runs: list[tuple]) -> dict[str, float]:
    """Where an end-to-end Dex run's time goes (medians, ms), from the run's and its steps' timestamps
    (the worker and Postgres share this machine's clock)."""
    from django.db.models import Max, Min

    from runs.models import Run

    if not runs:
        return {}
    seen = {run_id: (started, triggered, done) for run_id, started, triggered, done in runs}
    rows = Run.objects.filter(id__in=seen).annotate(first=Min("steps__started_at"), last=Max("steps__finished_at"))
    phases: dict[str, list[float]] = {}
    for run in rows.values("id", "claimed_at", "finished_at", "first", "last"):
        started, triggered, done = seen[run["id"]]
        marks = [
            ("trigger_call", started, triggered),
            ("trigger_returned_to_claim", triggered, run["claimed_at"].timestamp()),
            ("claim_to_first_step", run["claimed_at"].timestamp(), run["first"].timestamp()),
            ("first_step_to_last_step_done", run["first"].timestamp(), run["last"].timestamp()),
            ("last_step_done_to_settled", run["last"].timestamp(), run["finished_at"].timestamp()),
            ("settled_to_completion_seen", run["finished_at"].timestamp(), done),
        ]
        for name, a, b in marks:
            phases.setdefault(name, []).append((b - a) * 1000)
    return {name: statistics.median(values) for name, values in phases.items()}


def _cpu_per_step(samples: list, steps: int) -> dict[str, float] | None:
    parts: dict[str, float] = {}
    counted = 0
    for s in samples:
        if s.cpu is None:
            continue
        counted += 1
        for part, seconds in s.cpu.items():
            parts[part] = parts.get(part, 0.0) + seconds
    if not counted:
        return None
    out = {part: seconds * 1000 / (counted * steps) for part, seconds in parts.items()}
    out["total"] = sum(out.values())
    return out


# --- counting write commits -----------------------------------------------------------------------------------------


def _count_dex_commits(env: BenchEnv, wal: WalCommits | None) -> dict[str, Any]:
    """In-process runs of 10 and of 0 steps, with nothing else of ours running: transaction ids assigned,
    WAL syncs, and the statements the engine sent."""
    from django.db import connection

    from runs import engine

    probe = env.probe
    deltas: dict[int, dict[str, list[int]]] = {
        n: {"commits": [], "xids": [], "wal_syncs": [], "wal_bytes": [], "xact_commits": []} for n in (STEPS, 0)
    }
    statements: dict[int, list[str]] = {}

    def recorder_for(steps: int):
        recorded: list[str] = []
        statements[steps] = recorded

        def record(execute, sql, params, many, context):
            recorded.append(sql)
            return execute(sql, params, many, context)

        return record

    runs = max(2, env.sizes.count_runs)
    log(f"counting write commits: {runs} in-process runs each of {STEPS} and 0 steps")
    force_stats_flush(connection)
    updates_before = _run_updates()
    for i in range(runs + 1):  # the first of each is a warm-up
        for steps in (STEPS, 0):
            run_id = _new_run(env, steps)
            _flush_publisher()
            force_stats_flush(connection)
            x0, w0, c0 = probe.next_xid(), probe.wal_sync(), probe.xact_commit(env.database_name)
            b0, lsn0 = probe.wal_bytes(), probe.wal_lsn()
            wrapper = recorder_for(steps) if i == 1 else None
            with connection.execute_wrapper(wrapper) if wrapper else contextlib.nullcontext():
                status = engine.run_execute(run_id)
            b1, lsn1 = probe.wal_bytes(), probe.wal_lsn()
            force_stats_flush(connection)
            x1, w1, c1 = probe.next_xid(), probe.wal_sync(), probe.xact_commit(env.database_name)
            if status != "completed":
                raise RuntimeError(f"in-process run of {steps} steps ended {status}")
            if i == 0:
                continue
            deltas[steps]["xids"].append(x1 - x0)
            commits = wal.count(lsn0, lsn1) if wal else None
            deltas[steps]["commits"].append(x1 - x0 if commits is None else commits)
            deltas[steps]["wal_bytes"].append(b1 - b0)
            if w0 is not None and w1 is not None:
                deltas[steps]["wal_syncs"].append(w1 - w0)
            deltas[steps]["xact_commits"].append(c1 - c0 - 1)  # less the flush statement's own commit
    force_stats_flush(connection)
    updates_after = _run_updates()
    xids10, xids0 = min(deltas[STEPS]["commits"]), min(deltas[0]["commits"])
    wal10, wal0 = min(deltas[STEPS]["wal_bytes"]), min(deltas[0]["wal_bytes"])
    out: dict[str, Any] = {
        "xids_per_run_inprocess": min(deltas[STEPS]["xids"]),
        "write_commits_per_step_inprocess": xids10 / STEPS,
        "write_commits_per_step_marginal": (xids10 - xids0) / STEPS,
        "write_commits_fixed_per_run": xids0,
        "statements_per_run": len(statements[STEPS]),
        "statements_per_step_marginal": (len(statements[STEPS]) - len(statements[0])) / STEPS,
        "wal_bytes_per_step_marginal": (wal10 - wal0) / STEPS,
        "_detail": {
            "runs_of_10_steps": deltas[STEPS],
            "runs_of_0_steps": deltas[0],
            "statements_run_of_10": [_first_words(s) for s in statements[STEPS]],
            "note": "minima are reported: the server is shared, and other sessions only add to a delta",
        },
    }
    if deltas[STEPS]["wal_syncs"]:
        out["wal_syncs_per_step"] = min(deltas[STEPS]["wal_syncs"]) / STEPS
    updates = updates_after[0] - updates_before[0]
    if updates > 0:
        out["runs_run_hot_update_fraction"] = (updates_after[1] - updates_before[1]) / updates
    if deltas[STEPS]["xact_commits"] and connection.pg_version >= 150000:
        out["xact_commits_per_step_incl_readonly"] = min(deltas[STEPS]["xact_commits"]) / STEPS
    log(
        f"write commits per step in process {out['write_commits_per_step_inprocess']:.2f} (marginal "
        f"{out['write_commits_per_step_marginal']:.2f}, fixed {xids0} per run), "
        f"{out['statements_per_run']} statements per 10-step run"
    )
    return out


def _run_updates() -> tuple[int, int]:
    """(updates, HOT updates) of runs_run so far, as this database's statistics have them."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'runs_run'")
        row = cur.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _first_words(sql: str) -> str:
    words = " ".join(sql.split())
    return words[:90]


# --- pgbench: the commit floor's rate ---------------------------------------------------------------------------

FLOOR_SQL = "INSERT INTO bench_commit_floor DEFAULT VALUES"


def _pgbench_binary() -> str | None:
    """pgserver's pgbench (found without importing pgserver, which wants a runtime dir), else the system's."""
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "pginstall" / "bin" / "pgbench"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    return None


class Pgbench:
    """`pgbench -n -M prepared -c 1` of the commit floor's one-row INSERT (autocommit: one fsync'd commit a
    transaction), on the bench database."""

    def __init__(self, env: BenchEnv, binary: str):
        self.env = env
        self.binary = binary
        self.script = env.workdir / "floor.sql"
        self.script.write_text(FLOOR_SQL + ";\n")

    @classmethod
    def create(cls, env: BenchEnv) -> Pgbench | None:
        binary = _pgbench_binary()
        if binary is None:
            log("pgbench not found: fraction_of_pgbench_floor is left out")
            return None
        return cls(env, binary)

    def run(self, seconds: float) -> float:
        from urllib.parse import unquote, urlparse

        seconds = max(1, round(seconds))
        parsed = urlparse(self.env.database_url)
        args = [self.binary, "-n", "-M", "prepared", "-f", str(self.script), "-c", "1", "-T", str(seconds)]
        args += ["-h", url_host(self.env.database_url)]
        if parsed.port:
            args += ["-p", str(parsed.port)]
        args += ["-U", unquote(parsed.username or "postgres"), parsed.path.lstrip("/")]
        env = {"PATH": "/usr/bin:/bin"}
        if parsed.password:
            env["PGPASSWORD"] = unquote(parsed.password)
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=seconds + 60)
        out = done.stdout + done.stderr
        tps = re.search(r"tps = ([0-9.]+)", out)
        if done.returncode != 0 or not tps:
            raise RuntimeError(f"pgbench failed ({done.returncode}):\n{out[-2000:]}")
        log(f"pgbench: {float(tps.group(1)):.0f} one-row INSERT commits/s (prepared, 1 client, {seconds} s)")
        return float(tps.group(1))
