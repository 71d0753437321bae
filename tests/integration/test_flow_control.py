"""Flow control end to end: two real worker processes (two slots each) and the scheduler, against Postgres.

Limits are checked on what the database recorded — running counts sampled while the runs execute, and
the runs' started_at / finished_at — never on how fast we are.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

import tests.flow_agents  # noqa: F401  (registers the flow-control test tasks in this process)
from runs import services
from runs.models import TERMINAL_STATUSES, Run, RunStatus
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import SESSION, Proc, Processes, wait_for
from tests.flow_agents import AGENTS_QUEUE

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def celery_worker(procs: Processes, name: str, queue: str, slots: int, **env: str) -> Proc:
    proc = Proc(
        name,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "dexweb",
            "worker",
            "-l",
            "info",
            "-c",
            str(slots),
            "-Q",
            queue,
            "-n",
            f"{name}-{SESSION}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        {**procs.env, **env},
        procs.log_dir,
    ).start()
    procs.procs.append(proc)  # stopped with the others
    return proc


@pytest.fixture(scope="module")
def fleet(dex_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Two workers of two slots each (four slots: more than any limit below), a worker for AGENTS_QUEUE only,
    and a scheduler, shared by the module's tests (started together); every test leaves its runs finished."""
    env = {**dex_env, "DEX_AGENT_MODULES": "tests.agents,tests.flow_agents"}
    procs = Processes(env, tmp_path_factory.mktemp("flow"))
    try:
        workers = [
            celery_worker(procs, "flow-a", env["DEX_DEFAULT_QUEUE"], 2),
            celery_worker(procs, "flow-b", env["DEX_DEFAULT_QUEUE"], 2),
            celery_worker(procs, "flow-agents", AGENTS_QUEUE, 1, DEX_TEST_WORKER_ROLE="agents"),
        ]
        procs.scheduler(name="flow-scheduler")
        for worker in workers:
            worker.wait_for_log("ready.")
        yield procs
    finally:
        for proc in procs.procs:  # all shut down at once, not one after the other
            if proc.popen is not None and proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        procs.stop_all()


def all_finished(runs: list[Run], timeout: float = 30) -> list[Run]:
    ids = [r.pk for r in runs]

    def done() -> list[Run] | None:
        fresh = {r.pk: r for r in Run.objects.filter(pk__in=ids)}
        return [fresh[i] for i in ids] if all(r.is_terminal for r in fresh.values()) else None

    return wait_for(done, timeout=timeout, what=f"{len(ids)} runs to finish")


def max_overlap(runs: list[Run]) -> int:
    """The most runs whose [started_at, finished_at) intervals overlap at one instant."""
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs], key=lambda e: e)
    best = current = 0
    for _, delta in edges:  # at equal instants the end (-1) sorts first: a slot handed on is no overlap
        current += delta
        best = max(best, current)
    return best


def test_it_never_runs_more_than_the_concurrency_limit_across_two_workers(fleet, ledger):
    runs = [
        services.run_trigger(task_id="t-flow-concurrency", payload={"ledger": str(ledger), "n": n, "pause": 0.25})[0]
        for n in range(8)
    ]
    sampled_max, reasons = 0, set()
    deadline = time.monotonic() + 60
    while Run.objects.filter(task_id="t-flow-concurrency").exclude(status__in=TERMINAL_STATUSES).exists():
        sampled_max = max(sampled_max, Run.objects.filter(task_id="t-flow-concurrency", status="running").count())
        reasons |= set(
            Run.objects.filter(task_id="t-flow-concurrency", status="queued").values_list("status_reason", flat=True)
        )
        assert time.monotonic() < deadline, "the runs did not finish"
        time.sleep(0.01)
    runs = all_finished(runs)
    assert all(r.status == RunStatus.COMPLETED for r in runs)
    assert sampled_max == 2
    assert max_overlap(runs) == 2
    assert "waiting for a concurrency slot (2/2 running)" in reasons
    # Runs over the limit were never claimed and let go: each was executed exactly once.
    assert [r.executions for r in runs] == [1] * 8
    assert sorted(ledger_lines(ledger)) == sorted(f"start {n}" for n in range(8))


def test_a_saturated_key_does_not_block_another_key_nor_hold_a_worker(fleet, ledger, tmp_path):
    hold = tmp_path / "release-a"
    payload = {"ledger": str(ledger), "hold_file": str(hold)}
    a1, _ = services.run_trigger(task_id="t-flow-per-user", payload={**payload, "user": {"id": "a"}, "n": 1})
    wait_for(lambda: Run.objects.get(pk=a1.pk).status == RunStatus.RUNNING, what="a1 to run")
    a2, _ = services.run_trigger(task_id="t-flow-per-user", payload={**payload, "user": {"id": "a"}, "n": 2})
    a2 = wait_for(lambda: Run.objects.filter(pk=a2.pk, status_reason__startswith="waiting").first(), what="a2 to wait")
    assert a2.status == RunStatus.QUEUED
    assert a2.status_reason == "waiting for a concurrency slot (1/1 running for user.id=a)"

    # Key "b" runs while key "a" is saturated (its hold file exists already, so it doesn't wait).
    hold_b = tmp_path / "release-b"
    hold_b.touch()
    (b1,) = all_finished(
        [
            services.run_trigger(
                task_id="t-flow-per-user", payload={**payload, "hold_file": str(hold_b), "user": {"id": "b"}}
            )[0]
        ]
    )
    assert b1.status == RunStatus.COMPLETED
    # The waiting run holds no worker: an unlimited run still gets one of the four slots at once.
    (other,) = all_finished([services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger)})[0]])
    assert other.status == RunStatus.COMPLETED
    assert Run.objects.get(pk=a2.pk).status == RunStatus.QUEUED

    hold.touch()  # a1 finishes; its slot goes to a2
    a1, a2 = all_finished([a1, a2])
    assert (a1.status, a2.status) == (RunStatus.COMPLETED, RunStatus.COMPLETED)
    assert a2.started_at >= a1.finished_at
    assert a2.status_reason == ""


def test_priority_orders_the_claim_of_runs_waiting_for_a_slot(fleet, ledger, tmp_path):
    hold = tmp_path / "release"
    blocker, _ = services.run_trigger(
        task_id="t-flow-priority", payload={"ledger": str(ledger), "name": "blocker", "hold_file": str(hold)}
    )
    wait_for(lambda: Run.objects.get(pk=blocker.pk).status == RunStatus.RUNNING, what="the blocker to run")
    waiting = [
        services.run_trigger(task_id="t-flow-priority", payload={"ledger": str(ledger), "name": name}, priority=p)[0]
        for name, p in [("low", 1), ("high", 9), ("default", 0), ("mid", 5), ("high-2", 9)]
    ]
    # Every wake-up was delivered and refused: all five wait, none holds a worker.
    wait_for(
        lambda: Run.objects.filter(pk__in=[r.pk for r in waiting], status_reason__startswith="waiting").count() == 5,
        what="the five runs to wait for the slot",
    )
    hold.touch()
    runs = all_finished([blocker, *waiting])
    assert all(r.status == RunStatus.COMPLETED for r in runs)
    assert ledger_lines(ledger) == ["blocker", "high", "high-2", "mid", "low", "default"]


def test_a_rate_limit_spaces_run_starts(fleet):
    runs = [services.run_trigger(task_id="t-flow-rate", payload={"n": n})[0] for n in range(12)]
    seen = wait_for(
        lambda: (
            Run.objects.filter(task_id="t-flow-rate", status_reason__startswith="rate limited (5 per 2s) until")
            .exclude(wake_at=None)
            .first()
        ),
        what="a run to wait for the rate limit's next window",
    )
    assert seen.status == RunStatus.QUEUED
    runs = all_finished(runs)
    assert all(r.status == RunStatus.COMPLETED for r in runs)
    starts = sorted(r.started_at for r in runs)
    # A sliding window: any 6 consecutive starts span at least the period.
    assert all(starts[i + 5] - starts[i] >= timedelta(seconds=2) for i in range(len(starts) - 5))
    assert all(r.executions == 1 for r in runs)


def test_a_rate_limit_of_five_per_ten_seconds_is_per_key(fleet):
    acme = [services.run_trigger(task_id="t-flow-rate-10s", payload={"tenant": "acme", "n": n})[0] for n in range(6)]
    sixth = wait_for(
        lambda: Run.objects.filter(pk__in=[r.pk for r in acme], status_reason__startswith="rate limited").first(),
        what="the sixth run to be rate limited",
    )
    assert "(5 per 10s for tenant=acme) until" in sixth.status_reason
    # Another tenant's window is its own: it starts at once.
    (other,) = all_finished([services.run_trigger(task_id="t-flow-rate-10s", payload={"tenant": "other"})[0]])
    assert other.status == RunStatus.COMPLETED
    assert Run.objects.get(pk=sixth.pk).status == RunStatus.QUEUED
    acme = all_finished(acme, timeout=40)
    assert all(r.status == RunStatus.COMPLETED for r in acme)
    starts = sorted(r.started_at for r in acme)
    assert starts[5] - starts[0] >= timedelta(seconds=10)
    assert starts[4] - starts[0] < timedelta(seconds=10)  # the first five were not held back


def test_debounce_runs_only_the_last_trigger_of_a_key(fleet):
    first = [
        services.run_trigger(task_id="t-flow-debounce", payload={"user_id": 1, "text": text})[0]
        for text in ("a", "b", "c")
    ]
    other, _ = services.run_trigger(task_id="t-flow-debounce", payload={"user_id": 2, "text": "x"})
    a, b, c, other = all_finished([*first, other])
    assert (c.status, c.output) == (RunStatus.COMPLETED, "1: c")
    assert (other.status, other.output) == (RunStatus.COMPLETED, "2: x")
    for superseded in (a, b):
        assert superseded.status == RunStatus.CANCELED
        assert superseded.started_at is None  # never ran
        assert superseded.status_reason.startswith("debounced: superseded by a later trigger")
    assert str(c.pk) in b.status_reason


def test_a_parked_run_gives_its_slot_to_the_next(fleet, ledger):
    runs = [services.run_trigger(task_id="t-flow-sleeper", payload={"ledger": str(ledger), "n": n})[0] for n in (1, 2)]
    wait_for(
        lambda: Run.objects.filter(pk__in=[r.pk for r in runs], status=RunStatus.WAITING).count() == 2,
        what="both runs to park (the second starts once the first sleeps)",
    )
    assert sorted(ledger_lines(ledger)) == ["before sleep 1", "before sleep 2"]
    for run in runs:
        services.run_cancel(run=run, by=Actor.system("tests"))


def test_a_task_with_a_queue_runs_on_the_workers_of_that_queue(fleet):
    from runs.management.commands.dev import task_queues

    assert AGENTS_QUEUE in task_queues()  # `manage.py dev` consumes it too
    (run,) = all_finished([services.run_trigger(task_id="t-flow-queued", payload={})[0]])
    # Only the worker started for AGENTS_QUEUE has DEX_TEST_WORKER_ROLE set.
    assert (run.status, run.queue, run.priority, run.output) == (RunStatus.COMPLETED, AGENTS_QUEUE, 3, "agents")
