"""DESIGN §3's guarantees, checked the way a user of a peer would check them: real worker and scheduler
processes, every side effect counted in a ledger file outside Dex's database, SIGKILL at the worst moment.
The tasks are in tests/guarantee_agents.py."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.db import connection
from django.test import Client

from runs import services
from runs.models import ApiKey, LogLine, Run, RunStatus, Waitpoint
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import Processes, wait_for
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BY = Actor.system("tests")


def trigger(task_id: str, **payload: Any) -> Run:
    run, _ = services.run_trigger(task_id=task_id, payload=payload)
    return run


def status_of(run: Run) -> str:
    run.refresh_from_db()
    return run.status


def open_waitpoint(run: Run, key: str) -> Waitpoint:
    return wait_for(
        lambda: (
            Waitpoint.objects.filter(run=run, step_key=key, completed_at__isnull=True).first()
            if status_of(run) == RunStatus.WAITING
            else None
        ),
        what=f"run {run.id} to wait at {key}",
    )


def api_get(path: str) -> Any:
    _key, secret = ApiKey.generate(name="guarantees")
    response = Client(headers={"authorization": f"Bearer {secret}"}).get(path)
    assert response.status_code == 200, response.content
    return response.json()


# --- pausing runs no agent code -----------------------------------------------------------------------------


@pytest.fixture
def llm_providers():
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    try:
        yield json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    finally:
        server.stop()


def test_a_step_in_finally_runs_once_when_the_run_really_ends_for_every_kind_of_pause(
    processes: Processes, tmp_path: Path, llm_providers: str
) -> None:
    """`try: <pause>; ctx.step("work") finally: ctx.step("cleanup")`: parking unwinds the stack through the
    `finally:`, but its step must not run then — only when the run's code really ends. The ledger reads work,
    cleanup for sleep, event, approval, child run, retry back-off and budget approval alike."""
    processes.worker(concurrency=2, DEX_LLM_PROVIDERS=llm_providers)
    processes.scheduler()
    kinds = ["sleep", "event", "approval", "invoke", "retry", "budget"]
    runs = {kind: trigger("g-finally", ledger=str(tmp_path / kind), kind=kind, key=kind) for kind in kinds}

    # The pauses that wait on someone are answered once the run has parked on them.
    open_waitpoint(runs["event"], "hear")
    services.event_send(name="g.finally", data={"key": "event"})
    for kind, key in (("approval", "ok?"), ("budget", "budget:ask")):
        wp = open_waitpoint(runs[kind], key)
        services.waitpoint_complete(token=wp.token, data={"approved": True}, by=BY)

    expected = {kind: ["work", "cleanup"] for kind in kinds}
    expected["invoke"] = ["child", "work", "cleanup"]
    expected["retry"] = ["flaky failed", "work", "cleanup"]
    for kind, run in runs.items():
        finished(run, timeout=60)
        assert run.status == RunStatus.COMPLETED, (kind, run.error)
        assert ledger_lines(tmp_path / kind) == expected[kind], kind
        assert run.executions >= 2, kind  # it did park and resume


# --- deadlines are recorded ---------------------------------------------------------------------------------


def test_cancel_then_retry_sleeps_only_what_is_left_of_the_sleep(processes: Processes, ledger: Path) -> None:
    processes.worker()
    processes.scheduler()
    run = trigger("g-sleep", ledger=str(ledger), seconds=4)
    wait_for(lambda: status_of(run) == RunStatus.WAITING, what="the run to sleep")
    deadline = run.steps.get(key="nap").wake_at
    services.run_cancel(run=run, by=BY)
    services.run_retry(run=run, by=BY)

    # The retried run parks again on the deadline recorded when the sleep began, not on a new one.
    wait_for(lambda: status_of(run) == RunStatus.WAITING and run.executions == 2, what="the run to sleep again")
    assert run.wake_at == deadline == run.steps.get(key="nap").wake_at
    finished(run)
    assert run.status == RunStatus.COMPLETED
    assert run.output >= deadline.timestamp()  # the next step ran after the recorded wake-up, not before
    assert ledger_lines(ledger) == ["before"]


def test_cancel_then_retry_keeps_a_waits_timeout(processes: Processes, ledger: Path) -> None:
    processes.worker()
    processes.scheduler()
    run = trigger("g-wait-timeout", ledger=str(ledger), key="k", seconds=4)
    timeout_at = open_waitpoint(run, "hear").timeout_at
    services.run_cancel(run=run, by=BY)
    services.run_retry(run=run, by=BY)

    wait_for(lambda: status_of(run) == RunStatus.WAITING and run.executions == 2, what="the run to wait again")
    assert run.wake_at == timeout_at == Waitpoint.objects.get(run=run, step_key="hear").timeout_at
    finished(run)
    assert (run.status, run.output) == (RunStatus.COMPLETED, None)  # timed out, at the recorded time
    assert run.steps.get(key="hear").finished_at >= timeout_at


def test_a_fork_after_a_sleep_does_not_sleep_again(processes: Processes, ledger: Path) -> None:
    processes.worker()
    processes.scheduler()
    run = trigger("g-sleep", ledger=str(ledger), seconds=0.5)
    finished(run)
    fork = services.run_fork(run=run, step_key="after", by=BY)
    finished(fork)
    assert fork.status == RunStatus.COMPLETED
    nap = fork.steps.get(key="nap")
    assert nap.meta["reused_from"] == str(run.pk) and fork.executions == 1  # never parked
    assert ledger_lines(ledger) == ["before"]


# --- no lost-event race -------------------------------------------------------------------------------------


def test_an_event_sent_before_its_wait_began_is_not_lost_and_each_counts_once(
    processes: Processes, ledger: Path, tmp_path: Path
) -> None:
    processes.worker()
    processes.scheduler()
    services.event_send(name="g.race", data={"key": "k1", "n": 0})  # before the run exists: doesn't count
    gate = tmp_path / "gate"
    run = trigger("g-event-race", ledger=str(ledger), gate=str(gate), key="k1")
    wait_for(lambda: "slow started" in ledger_lines(ledger), what="the slow step")
    # While the run is still in its first step, before either wait began:
    services.event_send(name="g.race", data={"key": "k1", "n": 1})
    services.event_send(name="g.race", data={"key": "other", "n": 2})
    services.event_send(name="g.race", data={"key": "k1", "n": 3})
    gate.touch()

    finished(run)
    assert run.status == RunStatus.COMPLETED, run.error
    # Two waits for the same event consume two events, in order; each at most once.
    assert run.output == {"first": {"key": "k1", "n": 1}, "second": {"key": "k1", "n": 3}}
    consumed = list(Waitpoint.objects.filter(run=run).values_list("event_id", flat=True))
    assert len(consumed) == len(set(consumed)) == 2


def test_lookback_zero_counts_only_events_after_the_wait_began(
    processes: Processes, ledger: Path, tmp_path: Path
) -> None:
    processes.worker()
    processes.scheduler()
    gate = tmp_path / "gate"
    run = trigger("g-event-race", ledger=str(ledger), gate=str(gate), key="k2", lookback=0.0, timeout=1.5)
    wait_for(lambda: "slow started" in ledger_lines(ledger), what="the slow step")
    services.event_send(name="g.race", data={"key": "k2", "n": 1})
    gate.touch()
    finished(run)
    # The first wait (lookback=0) did not see the earlier event and timed out; the second (the default window,
    # from the run's creation) still gets it, unconsumed.
    assert run.output == {"first": None, "second": {"key": "k2", "n": 1}}


# --- durable return and one commit per step -------------------------------------------------------------------


def test_sigkill_between_two_steps_reruns_no_finished_step(processes: Processes, ledger: Path, tmp_path: Path) -> None:
    """When `ctx.step` returns, its result is committed: a worker killed while the agent's code runs between
    two steps does not pay for the finished step (say, an LLM call) again."""
    worker = processes.worker()
    processes.scheduler()
    gate = tmp_path / "gate"
    run = trigger("g-between", ledger=str(ledger), gate=str(gate))
    wait_for(lambda: "between" in ledger_lines(ledger), what="the agent code between the steps")
    worker.kill()
    gate.touch()
    processes.worker(name="replacement")
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED
    assert ledger_lines(ledger) == ["paid-call", "between", "between", "next"]


def next_xid() -> int:
    """The next transaction id Postgres will assign: only writing transactions take one."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        return cur.fetchone()[0]


@pytest.fixture
def no_autovacuum() -> Iterator[None]:
    """Autovacuum's ANALYZE takes transaction ids of its own: keep it off the run tables while counting."""
    tables = ["runs_run", "runs_step", "runs_logline"]
    with connection.cursor() as cur:
        for table in tables:
            cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    try:
        yield
    finally:
        with connection.cursor() as cur:
            for table in tables:
                cur.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")


def test_a_ten_step_run_writes_one_commit_per_step_plus_trigger_claim_and_settle(
    processes: Processes, ledger: Path, no_autovacuum: None
) -> None:
    # A long lease and in-flight threshold: no heartbeat write lands inside this short run.
    processes.worker(DEX_LEASE_SECONDS="120", DEX_INFLIGHT_AFTER_SECONDS="60")
    before = next_xid()
    run = trigger("t-ten-steps", ledger=str(ledger))
    finished(run)
    assert run.status == RunStatus.COMPLETED
    assert next_xid() - before == 10 + 3  # one per step; the trigger, the claim and the settle


# --- death detection, worker-lost attempts, recovery ahead of new work ---------------------------------------


def pool_child(worker_pid: int) -> psutil.Process:
    children = wait_for(lambda: psutil.Process(worker_pid).children(), what="the worker's pool process")
    (child,) = children
    return child


def test_a_killed_worker_is_noticed_before_its_lease_expires_and_shows_as_a_lost_attempt(
    processes: Processes, ledger: Path, tmp_path: Path
) -> None:
    default_lease = {"DEX_LEASE_SECONDS": "15"}
    worker = processes.worker(**default_lease)
    processes.scheduler(**default_lease)
    gate = tmp_path / "gate"
    run = trigger("g-long-step", ledger=str(ledger), gate=str(gate))
    wait_for(lambda: "long attempt 1" in ledger_lines(ledger), what="the long step")
    wait_for(lambda: Run.objects.get(pk=run.pk).inflight, what="the heartbeat to record the step in flight")
    lease_expires_at = Run.objects.get(pk=run.pk).lease_expires_at

    os.kill(pool_child(worker.pid).pid, signal.SIGKILL)  # the process executing the run; Celery starts another
    wait_for(lambda: Run.objects.get(pk=run.pk).executions == 2, what="the run to be taken again")
    gate.touch()
    finished(run)

    assert run.status == RunStatus.COMPLETED
    assert run.recoveries == 1
    assert run.claimed_at < lease_expires_at  # recovered by death detection, not by the lease's expiry
    assert ledger_lines(ledger) == ["long attempt 1", "long attempt 2", "after"]
    step = run.steps.get(key="long")
    assert step.attempts == 2
    assert step.history[0]["error"]["type"] == "WorkerLost" and step.history[0]["attempt"] == 1
    (api_step,) = [s for s in api_get(f"/api/runs/{run.pk}")["steps"] if s["key"] == "long"]
    assert api_step["attempts"] == 2 and api_step["failed_attempts"][0]["error"]["type"] == "WorkerLost"


def test_a_recovered_run_goes_ahead_of_queued_work_and_no_wake_up_dies_with_its_worker(
    processes: Processes, ledger: Path, tmp_path: Path
) -> None:
    """Two workers; one runs a long run while the other works through a queue. SIGKILL the first (its whole
    process group): the long run is recovered and taken before the work still queued, and nothing waits for the
    stale-run re-send (set to an hour here) — the dead worker held no wake-up it had not started."""
    env = {"DEX_REQUEUE_STALE_SECONDS": "3600"}
    first = processes.worker(name="first", **env)
    gate = tmp_path / "gate"
    long_run = trigger("g-long-step", ledger=str(ledger), gate=str(gate))
    wait_for(lambda: "long attempt 1" in ledger_lines(ledger), what="the long step")
    processes.worker(name="second", **env)
    processes.scheduler(**env)
    queued = [trigger("g-quick", ledger=str(ledger), n=n) for n in range(12)]
    wait_for(lambda: "quick 0" in ledger_lines(ledger), what="the second worker to start on the queue")

    first.kill()
    gate.touch()
    finished(long_run, timeout=60)
    for run in queued:
        finished(run, timeout=60)
    assert long_run.status == RunStatus.COMPLETED and long_run.recoveries == 1
    started_after = sum(run.started_at > long_run.claimed_at for run in queued)
    assert started_after >= len(queued) // 2, f"only {started_after} queued runs started after the recovered one"


# --- replay-aware logging -----------------------------------------------------------------------------------


def test_a_log_line_outside_steps_is_stored_once_per_run(processes: Processes, ledger: Path) -> None:
    processes.worker()
    processes.scheduler()
    run = trigger("g-logs", ledger=str(ledger))
    finished(run)
    assert run.status == RunStatus.COMPLETED and run.executions == 3  # two retry back-offs re-ran its code
    lines = list(LogLine.objects.filter(run=run, step_key="").values_list("message", flat=True))
    assert lines == ["starting the run", "finished the run"]
