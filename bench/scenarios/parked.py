"""parked: thousands of runs parked (sleeping or waiting for an event) hold nothing; then all are woken.

N runs (10,000; 2,000 with --quick; 200 with --tiny) of two bench tasks (bench/agents.py), each a step, a park,
a step:
  waiters   N/2 runs in `ctx.wait_for_event(event=WAKE_EVENT, match={"key": <its own key>})`
  sleepers  N/2 runs in `ctx.sleep(D)`, one fixed duration D for all, chosen (from the waiters' parking rate)
            long enough that every run is parked and the idle window is over before the first is due
They are triggered through `services.run_trigger` and executed by the bench's own Celery worker (2 processes)
with the bench's own scheduler process running (`manage.py scheduler`, wrapped by bench/scheduler_probe.py to
log every statement it sends). Then, with all N parked:

  worker_slots_held     Celery `inspect active` + `reserved` (+ `scheduled`, ETA messages) of the worker
  worker_rss_growth_mb  RSS of the worker's process tree (psutil) now, less after the warm-up (before parking)
  idle_queries_per_s    the scheduler's statements in an idle window (nothing due), per second, counted in the
                        scheduler process at psycopg's Cursor.execute (every statement it sends, Django's own
                        included). pg_stat_statements is not loaded on the embedded server; the server-side
                        cross-check `idle_xact_commits_per_s_server` is pg_stat_database.xact_commit's delta for
                        the bench database over the same window (an idle backend publishes its counters up to
                        10 s late, so the window starts 11 s after the last park; the other connections to the
                        database, the worker's, are idle then; autovacuum would count here too)

Then all are woken: from the moment the first sleeper is due the scheduler wakes the sleepers as they come due
(they come due at the rate they parked) while the bench sends each waiter its own event through
`runs.services.event_send` in a loop. Per run, wake latency = finished_at − (its wake_at | the moment before its
event was sent): `wake_p99_s`. `wake_steps_per_s` = steps finished from the first due moment to the last run's
finish, per second (each run finishes its park step and its last step).

The peer way of sleeping, side by side on a fresh worker of the same kind: N Celery tasks sent with
`countdown=` (ETA messages). Celery holds each one in the worker (reserved/scheduled) until due; their count
and the worker's RSS growth are reported (`celery_eta_*`). Celery has no wait-for-event to compare with.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import ROOT, BenchEnv, Worker, goal_met, log, rounded

NAME = "parked"
GOAL = {"worker_slots_held": "== 0", "worker_rss_growth_mb": "< 50", "idle_queries_per_s": "<= 1"}
RUNS = {"full": 10_000, "quick": 2_000, "tiny": 200}
IDLE_WINDOW = {"full": 10.0, "quick": 10.0, "tiny": 3.0}
WORKER_CONCURRENCY = 2
# s after parking before the idle window (see _idle_window); --tiny doesn't wait (its cross-check is rough)
STATS_SETTLE = {"full": 11.0, "quick": 11.0, "tiny": 1.0}
WARMUP_RUNS = 10  # of each kind, parked and woken before the "before" RSS is read


def run(env: BenchEnv) -> dict:
    import redis

    started = time.monotonic()
    n = RUNS[env.sizes.name]
    window = IDLE_WINDOW[env.sizes.name]
    _reset()
    client = redis.Redis.from_url(env.redis_url)
    scheduler_log = env.workdir / "scheduler-statements.tsv"
    _start_scheduler(env, scheduler_log)
    with _environ(DEX_BENCH_NO_DONE_SIGNAL="1"):
        worker = env.start_worker(concurrency=WORKER_CONCURRENCY, name="parked")

    _warm_up(env)
    time.sleep(1.0)
    rss_before = _rss_mb(worker)
    log(f"worker RSS after warm-up {rss_before:.1f} MB; parking {n} runs")

    park = _park(env, n, window)
    time.sleep(1.0)  # let the last park's publishes and acks settle
    held = _held(worker)
    broker_backlog = client.llen(env.queue)
    rss_parked = _rss_mb(worker)
    log(f"all {n} parked: worker holds {held}, broker backlog {broker_backlog}, RSS {rss_parked:.1f} MB")

    idle = _idle_window(env, scheduler_log, window, park)
    log(f"idle scheduler: {idle['idle_queries_per_s']:.2f} statements/s ({idle['idle_statements']})")

    wake = _wake(env, n, park)
    log(
        f"woke {n}: {wake['wake_steps_per_s']:.0f} steps/s, p99 {wake['wake_p99_s']:.2f} s, "
        f"events sent {wake['events_sent_per_s']:.0f}/s"
    )
    rss_after_wake = _rss_mb(worker)
    worker.stop()

    peer = _celery_eta(env, client, n)
    log(f"celery ETA peer: holds {peer['celery_eta_messages_held']}, RSS +{peer['celery_eta_rss_growth_mb']:.1f} MB")

    slots = held["active"] + held["reserved"]
    rss_growth = rss_parked - rss_before
    figures: dict[str, Any] = {
        "worker_slots_held": slots,
        "worker_rss_growth_mb": rss_growth,
        "idle_queries_per_s": idle["idle_queries_per_s"],
        "wake_steps_per_s": wake["wake_steps_per_s"],
        "wake_p99_s": wake["wake_p99_s"],
        "parked_per_s": park["parked_per_s"],
        "parked_runs": n,
        "worker_messages_held_incl_scheduled": slots + held["scheduled"],
        "broker_backlog_while_parked": broker_backlog,
        "idle_queries_per_tick": idle["idle_queries_per_tick"],
        "idle_xact_commits_per_s_server": idle["idle_xact_commits_per_s_server"],
        "wake_p50_s": wake["wake_p50_s"],
        "wake_p99_s_sleepers": wake["wake_p99_s_sleepers"],
        "wake_p99_s_waiters": wake["wake_p99_s_waiters"],
        "wake_runs_per_s": wake["wake_runs_per_s"],
        "events_sent_per_s": wake["events_sent_per_s"],
        "worker_rss_growth_mb_after_wake": rss_after_wake - rss_before,
        "celery_eta_messages_held": peer["celery_eta_messages_held"],
        "celery_eta_rss_growth_mb": peer["celery_eta_rss_growth_mb"],
    }
    if peer["celery_eta_rss_growth_mb"] > 0:
        figures["rss_growth_ratio_vs_celery_eta"] = rss_growth / peer["celery_eta_rss_growth_mb"]
    goals_met = {name: goal_met(figures.get(name), goal) for name, goal in GOAL.items()}
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": all(goals_met.values()),
            "goals_met": goals_met,
            "held_while_parked": held,
            "rss_mb": {"before_parking": rss_before, "all_parked": rss_parked, "after_wake": rss_after_wake},
            "parking": {k: v for k, v in park.items() if not k.startswith("_") and k != "first_due"},
            "idle_scheduler": idle,
            "wake": wake,
            "celery_eta_peer": peer,
            "sizes": {"runs": n, "idle_window_s": window, "worker_concurrency": WORKER_CONCURRENCY},
            "seconds": time.monotonic() - started,
            "note": (
                "One run, no alternation: the figures are counts and state, not timings to be paired. "
                "worker_slots_held = Celery inspect active + reserved of the bench worker while all N are parked "
                "(scheduled ETA messages are counted separately and are 0 too); worker_rss_growth_mb = RSS sum "
                "over the worker's process tree (psutil) with all parked, less after a warm-up that parked and "
                "woke 2x10 runs. idle_queries_per_s: every statement the scheduler process sent in an idle "
                "window (no row due, all N parked), logged at psycopg Cursor.execute by bench/scheduler_probe.py "
                "(pg_stat_statements is not loaded on the embedded server), divided by the window; the "
                "statements are listed in idle_scheduler.statements. idle_xact_commits_per_s_server is the "
                "server's pg_stat_database.xact_commit delta for the bench database over the same window, a "
                "cross-check (read after waiting 11 s for the worker backends' late-published counters; autovacuum's "
                "transactions would count there too). Wake: sleepers "
                "(ctx.sleep, one fixed duration) come due at the rate they parked and the scheduler wakes them; "
                "waiters get their own event via runs.services.event_send in a loop starting when the first sleeper "
                "is due; latency per run = finished_at - (wake_at | event send start); wake_steps_per_s = steps "
                "finished in [first due, last finish]. Peer: the same N as Celery tasks with countdown= on a "
                "fresh worker of the same concurrency: messages it holds (reserved+scheduled) and its RSS growth."
            ),
        }
    )


# --- setup ------------------------------------------------------------------------------------------------------


def _reset() -> None:
    """Empty the bench database's runs and events (it is the benchmark's own)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE runs_run, runs_event CASCADE")


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_scheduler(env: BenchEnv, statements: Path) -> subprocess.Popen:
    """The bench's own scheduler (bench/scheduler_probe.py: `manage.py scheduler` logging its statements)."""
    out = open(env.workdir / "scheduler.log", "ab")  # noqa: SIM115  (closed by the stack)
    env.stack.callback(out.close)
    popen = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "scheduler_probe.py"), str(statements)],
        cwd=ROOT,
        env={**os.environ, "DEX_LOG_LEVEL": "INFO"},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=20)

    env.stack.callback(stop)
    deadline = time.monotonic() + 60
    while not (statements.exists() and "WITH due AS" in statements.read_text(errors="replace")):
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bench scheduler did not start (see scheduler.log)")
        time.sleep(0.1)
    log(f"scheduler ready (pid {popen.pid})")
    return popen


# --- measuring --------------------------------------------------------------------------------------------------


def _rss_mb(worker: Worker) -> float:
    import psutil

    assert worker.popen is not None
    root = psutil.Process(worker.popen.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


def _held(worker: Worker) -> dict[str, int]:
    """Messages the worker holds: executing (active), prefetched (reserved), ETA/countdown (scheduled)."""
    from celery import current_app

    node = f"{worker.name}-{worker.env.session}@{socket.gethostname()}"
    inspect = current_app.control.inspect(destination=[node], timeout=3.0)
    out = {}
    for what in ("active", "reserved", "scheduled"):
        reply = getattr(inspect, what)()
        if not reply or node not in reply:
            raise RuntimeError(f"the worker {node} did not answer `inspect {what}`: {reply!r}")
        out[what] = len(reply[node])
    return out


def _wait_for(what: str, predicate, timeout: float, interval: float = 0.2) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _counts(task_ids: list[str]) -> dict[str, int]:
    from django.db.models import Count

    from runs.models import Run

    rows = Run.objects.filter(task_id__in=task_ids).values("status").annotate(n=Count("id"))
    counts = {r["status"]: r["n"] for r in rows}
    bad = {s: c for s, c in counts.items() if s in ("failed", "canceled", "timed_out")}
    if bad:
        raise RuntimeError(f"bench runs ended badly: {bad}")
    return counts


# --- the phases -------------------------------------------------------------------------------------------------


def _warm_up(env: BenchEnv) -> None:
    """Park and wake a few of each kind, so the worker has imported and allocated what parking needs."""
    from bench.agents import SLEEPER_TASK_ID, WAITER_TASK_ID, WAKE_EVENT
    from runs import services

    for i in range(WARMUP_RUNS):
        services.run_trigger(task_id=SLEEPER_TASK_ID, payload={"seconds": 1.0})
        services.run_trigger(task_id=WAITER_TASK_ID, payload={"key": f"warm{i}"})
    ids = [SLEEPER_TASK_ID, WAITER_TASK_ID]
    # Every waiter must be parked before its event is sent: an event resumes only waits begun before it.
    # (Counting both kinds let 1 s sleepers stand in for waiters not yet parked, whose events then went unheard.)
    _wait_for("the warm-up waiters to park", lambda: _counts([WAITER_TASK_ID]).get("waiting", 0) >= WARMUP_RUNS, 60)
    for i in range(WARMUP_RUNS):
        services.event_send(name=WAKE_EVENT, data={"key": f"warm{i}"})
    _wait_for("the warm-up to finish", lambda: _counts(ids).get("completed", 0) == 2 * WARMUP_RUNS, 60)


def _park(env: BenchEnv, n: int, window: float) -> dict:
    from bench.agents import SLEEPER_TASK_ID, WAITER_TASK_ID
    from runs import services
    from runs.models import Run

    half = n // 2
    timeout = 120 + n / 10
    t0 = time.time()
    for i in range(half):
        services.run_trigger(task_id=WAITER_TASK_ID, payload={"key": f"k{i}"})
    triggered_w = time.time()
    waiting = lambda task_id, count: lambda: _counts([task_id]).get("waiting", 0) >= count  # noqa: E731
    t_w = _wait_for("the waiters to park", waiting(WAITER_TASK_ID, half), timeout)
    rate = half / max(t_w - t0, 1e-3)
    # One fixed duration for every sleeper: all of them parked, the checks made and the idle window over
    # before the first is due (sleepers park about as fast as the waiters did; 1.5x margin, plus the wait for
    # the server's counters to settle and a margin: 8 s, 3 s at --tiny, whose 200 runs park in about 2 s).
    margin = 3 if env.sizes.name == "tiny" else 8
    seconds = math.ceil(1.5 * (n - half) / rate + STATS_SETTLE[env.sizes.name] + window + margin)
    log(f"{half} waiters parked ({rate:.0f}/s); sleepers sleep {seconds} s")
    t_s = time.time()
    for _ in range(n - half):
        services.run_trigger(task_id=SLEEPER_TASK_ID, payload={"seconds": seconds})
    triggered_s = time.time()
    t_p = _wait_for("the sleepers to park", waiting(SLEEPER_TASK_ID, n - half), timeout)
    due = dict(
        Run.objects.filter(task_id=SLEEPER_TASK_ID, status="waiting").exclude(wake_at=None).values_list("id", "wake_at")
    )
    if len(due) != n - half:
        raise RuntimeError(f"{n - half} sleepers should be waiting with a wake_at; {len(due)} are")
    first_due = min(due.values()).timestamp()
    parking_seconds = (t_w - t0) + (t_p - t_s)
    return {
        "parked_per_s": n / parking_seconds,
        "waiters_parked_per_s": half / (t_w - t0),
        "sleepers_parked_per_s": (n - half) / (t_p - t_s),
        "triggers_per_s": n / ((triggered_w - t0) + (triggered_s - t_s)),
        "sleep_seconds": seconds,
        "sleep_due_spread_s": max(due.values()).timestamp() - first_due,
        "first_due": first_due,
        "_parked_at": t_p,
        "_due": {str(k): v.timestamp() for k, v in due.items()},
    }


def _idle_window(env: BenchEnv, statements: Path, window: float, park: dict) -> dict:
    from django.db import connection

    connection.close()  # the bench's own connection adds nothing to the server-side count
    # A backend that goes idle publishes its last counters up to 10 s later (PGSTAT_IDLE_INTERVAL): let the
    # worker's, from parking, land before the server-side cross-check starts.
    time.sleep(max(0.0, park["_parked_at"] + STATS_SETTLE[env.sizes.name] - time.time()))
    first_due = park["first_due"]
    assert env.probe is not None
    others = env.probe.backend_pids([env.database_name])
    x0, t0 = env.probe.xact_commit(env.database_name), time.time()
    time.sleep(window)
    t1 = time.time()
    time.sleep(1.2)  # Postgres publishes a backend's counters at most once a second
    x1 = env.probe.xact_commit(env.database_name)
    if t1 >= first_due:
        raise RuntimeError("a sleeper came due inside the idle window; the sleep was too short")
    seen: dict[str, int] = {}
    count = 0
    for line in statements.read_text(errors="replace").splitlines():
        at, _, sql = line.partition("\t")
        if t0 <= float(at) < t1:
            count += 1
            head = sql[:100]
            seen[head] = seen.get(head, 0) + 1
    ticks = sum(c for s, c in seen.items() if s.startswith("WITH due AS"))
    return {
        "idle_queries_per_s": count / (t1 - t0),
        "idle_queries_per_tick": count / ticks if ticks else float(count),
        "idle_ticks": ticks,
        "idle_statements": count,
        "idle_xact_commits_per_s_server": (x1 - x0) / (t1 - t0),
        "window_s": t1 - t0,
        "statements": seen,
        "idle_other_backends": len(others),
    }


def _wake(env: BenchEnv, n: int, park: dict) -> dict:
    from bench.agents import SLEEPER_TASK_ID, WAITER_TASK_ID, WAKE_EVENT
    from runs import services
    from runs.models import Run, Step

    ids = [SLEEPER_TASK_ID, WAITER_TASK_ID]
    delay = park["first_due"] - time.time()
    if delay > 0:
        time.sleep(delay)
    sent: dict[str, float] = {}
    keys = dict(Run.objects.filter(task_id=WAITER_TASK_ID, status="waiting").values_list("payload__key", "id"))
    e0 = time.time()
    for key, run_id in keys.items():
        sent[str(run_id)] = time.time()
        _event, created = services.event_send(name=WAKE_EVENT, data={"key": key})
        if not created:
            raise RuntimeError("an event was not stored")
    e1 = time.time()
    _wait_for("every parked run to finish", lambda: _counts(ids).get("completed", 0) >= n + 2 * WARMUP_RUNS, 300 + n)
    wake_start = min(park["first_due"], e0)
    finished = dict(
        Run.objects.filter(task_id__in=ids, finished_at__gte=_dt(wake_start)).values_list("id", "finished_at")
    )
    due = {**park["_due"], **sent}
    lat_s = [finished[uuid.UUID(r)].timestamp() - t for r, t in park["_due"].items()]
    lat_w = [finished[uuid.UUID(r)].timestamp() - t for r, t in sent.items()]
    if len(lat_s) + len(lat_w) != len(due):
        raise RuntimeError("some woken runs have no finish time")
    last = max(f.timestamp() for f in finished.values())
    steps = Step.objects.filter(run__task_id__in=ids, finished_at__gte=_dt(wake_start)).count()
    every = lat_s + lat_w
    return {
        "wake_steps_per_s": steps / (last - wake_start),
        "wake_runs_per_s": len(every) / (last - wake_start),
        "wake_p99_s": _pct(every, 99),
        "wake_p50_s": statistics.median(every),
        "wake_max_s": max(every),
        "wake_p99_s_sleepers": _pct(lat_s, 99),
        "wake_p99_s_waiters": _pct(lat_w, 99),
        "events_sent_per_s": len(sent) / max(e1 - e0, 1e-3),
        "steps_finished": steps,
        "seconds": last - wake_start,
    }


def _dt(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def _celery_eta(env: BenchEnv, client: Any, n: int) -> dict:
    """The peer way to sleep: N Celery tasks sent with `countdown=`, held by the worker until due."""
    from bench.agents import done_key, eta_noop

    worker = env.start_worker(concurrency=WORKER_CONCURRENCY, name="eta")
    token = uuid.uuid4().hex
    key = done_key(f"eta:{token}")
    env.stack.callback(client.delete, key)
    done = lambda count: lambda: int(client.get(key) or 0) >= count  # noqa: E731
    for _ in range(WARMUP_RUNS):
        eta_noop.apply_async((f"eta:{token}",), countdown=0.5)
    _wait_for("the ETA warm-up", done(WARMUP_RUNS), 60)
    time.sleep(1.0)
    rss_before = _rss_mb(worker)
    countdown = max(4.0 if env.sizes.name == "tiny" else 10.0, n / 500 + 8 if n > 500 else 0.0)
    t0 = time.time()
    for _ in range(n):
        eta_noop.apply_async((f"eta:{token}",), countdown=countdown)
    sent = time.time()
    held = _held(worker)
    while held["reserved"] + held["scheduled"] < n and time.time() < t0 + countdown - 3:
        time.sleep(0.5)
        held = _held(worker)
    time.sleep(0.5)
    rss_held = _rss_mb(worker)
    _wait_for("the ETA tasks to run", done(WARMUP_RUNS + n), countdown + 120 + n / 50)
    finished = time.time()
    worker.stop()
    return {
        "celery_eta_messages_held": held["active"] + held["reserved"] + held["scheduled"],
        "celery_eta_rss_growth_mb": rss_held - rss_before,
        "held": held,
        "countdown_s": countdown,
        "sent_per_s": n / max(sent - t0, 1e-3),
        "all_ran_s_after_first_due": finished - (t0 + countdown),
        "rss_mb": {"before": rss_before, "holding": rss_held},
    }
