"""The engine in-process (runs.testing drives runs without a worker; timers are skipped)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.utils import timezone

from runs import engine, services
from runs.models import LogLine, Run, RunStatus, Step, StepStatus
from runs.ops.audit import Actor
from runs.sdk import Retry, task
from runs.testing import drive, run_task
from tests.agents import ledger_lines

pytestmark = pytest.mark.django_db

CALLS: list[str] = []


def _call(name: str, value):
    CALLS.append(name)
    return value


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


@task("u-loop")
def loop_task(ctx, n: int = 3) -> list:
    return [ctx.step("search", _call, f"search{i}", i) for i in range(n)]


@task("u-transaction", retry=Retry(attempts=1))
def transaction_task(ctx, name: str, bad: bool = False) -> int:
    def create() -> object:
        group = Group.objects.create(name=name)
        return object() if bad else group.pk

    return ctx.transaction("create-group", create)


@task("u-cancel-inside")
def cancel_inside(ctx) -> None:
    ctx.step("one", _call, "one", 1)
    ctx.step("two", lambda: engine.run_request_cancel(ctx.run_id) and _call("two", 2))
    ctx.step("three", _call, "three", 3)


def test_it_memoises_steps_and_suffixes_repeated_ids():
    run = run_task(loop_task, {"n": 3})
    assert run.status == RunStatus.COMPLETED
    assert run.output == [0, 1, 2]
    assert list(run.steps.values_list("key", flat=True)) == ["search", "search#1", "search#2"]
    # Executing the finished run's code again (a retry) returns stored results without calling anything.
    CALLS.clear()
    Run.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED)
    run = drive(run)
    assert run.output == [0, 1, 2]
    assert CALLS == []


def test_it_retries_only_the_failed_step_and_keeps_every_attempt(ledger):
    run = run_task("t-flaky", {"ledger": str(ledger), "failures": 2})
    assert run.status == RunStatus.COMPLETED
    assert ledger_lines(ledger) == ["before", "flaky attempt 1", "flaky attempt 2", "flaky attempt 3", "after"]
    step = run.steps.get(key="flaky")
    assert (step.status, step.attempts) == (StepStatus.COMPLETED, 3)
    assert [a["attempt"] for a in step.history] == [1, 2]
    assert "ConnectionError" in step.history[0]["error"]["traceback"]


def test_it_fails_the_run_when_retries_run_out_and_names_the_step(ledger):
    run = run_task("t-fails", {"ledger": str(ledger)})
    assert run.status == RunStatus.FAILED
    assert run.error["step"] == "bad"
    assert run.error["message"] == "the step is broken"
    assert ledger_lines(ledger) == ["ok", "bad", "bad"]
    assert run.steps.get(key="bad").status == StepStatus.FAILED


def test_it_fails_at_once_on_a_nonretriable_error(ledger):
    run = run_task("t-fails", {"ledger": str(ledger), "nonretriable": True})
    assert run.status == RunStatus.FAILED
    assert ledger_lines(ledger) == ["ok", "bad"]
    assert run.error["type"] == "NonRetriableError"


def test_retry_resumes_from_the_failed_step(ledger):
    run = run_task("t-fails", {"ledger": str(ledger)})
    assert services.run_retry(run=run, by=Actor.system("tests")).status == RunStatus.QUEUED
    run = drive(run)
    assert run.status == RunStatus.FAILED
    # "ok" ran once in all; "bad" got a fresh budget of 2 attempts.
    assert ledger_lines(ledger) == ["ok", "bad", "bad", "bad", "bad"]
    assert run.steps.get(key="bad").attempts == 4


@pytest.mark.parametrize(
    ("kind", "message"),
    [("object", "can't be stored as JSON"), ("huge", "over the limit")],
)
def test_it_fails_a_step_whose_output_cant_be_stored(kind, message):
    run = run_task("t-bad-output", {"kind": kind})
    assert run.status == RunStatus.FAILED
    assert run.error["step"] == "make"
    assert "step 'make'" in run.error["message"]
    assert message in run.error["message"]


def test_it_fails_with_a_nondeterminism_error_naming_both_ids(tmp_path):
    run = run_task("t-switch", {"flag_file": str(tmp_path / "flag")})
    assert run.status == RunStatus.FAILED
    assert run.error["type"] == "NonDeterminismError"
    assert "'b'" in run.error["message"] and "'c'" in run.error["message"]
    assert 'ctx.patched("' in run.error["message"]  # and says how to ship such a change safely


def test_async_tasks_and_steps_work(ledger):
    run = run_task("t-async", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == 6
    assert ledger_lines(ledger) == ["add 1 2", "add 3 3"]


def test_a_step_over_its_timeout_fails_that_attempt_and_its_result_is_never_stored(ledger):
    run = run_task("t-slow-step", {"ledger": str(ledger), "seconds": 5})
    assert run.status == RunStatus.FAILED
    assert ledger_lines(ledger) == ["slow start 1", "slow start 2"]
    step = run.steps.get(key="slow")
    assert step.output is None
    assert "timeout" in run.error["message"]


def test_a_run_over_max_duration_ends_timed_out(ledger):
    run = run_task("t-max-duration", {"ledger": str(ledger)})
    assert run.status == RunStatus.TIMED_OUT
    assert 1 <= len(ledger_lines(ledger)) < 10


def test_logs_and_metadata_land_on_the_run_and_its_steps():
    run = run_task("t-metadata", {"ledger": "unused"})
    assert run.status == RunStatus.COMPLETED
    assert run.metadata == {"progress": 1.0}
    lines = list(LogLine.objects.filter(run=run).values_list("step_key", "level", "message"))
    assert ("", "INFO", "outside any step") in lines
    assert ("one", "WARNING", "inside step one") in lines


def test_transaction_steps_commit_orm_writes_with_their_checkpoint():
    run = run_task(transaction_task, {"name": "kept"})
    assert run.status == RunStatus.COMPLETED
    assert Group.objects.filter(name="kept", pk=run.output).exists()


def test_transaction_steps_roll_back_orm_writes_when_the_checkpoint_fails():
    run = run_task(transaction_task, {"name": "rolled-back", "bad": True})
    assert run.status == RunStatus.FAILED
    assert not Group.objects.filter(name="rolled-back").exists()


def test_cancel_during_a_step_stops_the_run_before_the_next_step():
    run = run_task(cancel_inside, {})
    assert run.status == RunStatus.CANCELED
    assert CALLS == ["one", "two"]
    assert list(run.steps.values_list("key", flat=True)) == ["one", "two"]


def test_a_stale_lease_holder_can_not_write():
    run = Run.objects.create(task_id="t-ten-steps", payload={"ledger": "x"})
    first = engine.run_claim(run.id, worker="a")
    assert first is not None
    assert engine.run_claim(run.id, worker="b") is None  # owned: nobody else claims it
    # The first worker stalls past its lease; the scheduler hands the run to another worker.
    Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    with engine.enqueue_to(lambda run_id: None):
        assert engine.scheduler_tick().recovered == 1
    second = engine.run_claim(run.id, worker="b")
    assert second is not None and second.token == first.token + 1
    assert engine.fenced_write(first, engine.Buffer()) is None
    assert engine.fenced_write(second, engine.Buffer()) is not None


def test_the_scheduler_wakes_due_runs_recovers_dead_workers_and_resends_lost_wakeups(settings):
    now = timezone.now()
    due = Run.objects.create(task_id="t-typed", status=RunStatus.WAITING, wake_at=now - timedelta(seconds=1))
    not_due = Run.objects.create(task_id="t-typed", status=RunStatus.WAITING, wake_at=now + timedelta(hours=1))
    orphan = Run.objects.create(
        task_id="t-typed", status=RunStatus.RUNNING, lease_expires_at=now - timedelta(seconds=1), claimed_at=now
    )
    poison = Run.objects.create(
        task_id="t-typed",
        status=RunStatus.RUNNING,
        lease_expires_at=now - timedelta(seconds=1),
        claimed_at=now,
        recoveries=settings.DEX_MAX_RECOVERIES - 1,
    )
    lost = Run.objects.create(task_id="t-typed", status=RunStatus.QUEUED, enqueued_at=now - timedelta(hours=1))
    sent: list[str] = []
    with engine.enqueue_to(sent.append):
        result = engine.scheduler_tick()
        # on_commit callbacks run inside the test's transaction only when it ends; run them now.
        for _sp, callback, _robust in connection.run_on_commit:
            callback()
        connection.run_on_commit.clear()
    assert (result.woken, result.recovered, result.dead, result.resent) == (1, 1, 1, 1)
    assert sorted(sent) == sorted(str(r.id) for r in (due, orphan, lost))
    for run in (due, not_due, orphan, poison):
        run.refresh_from_db()
    assert due.status == RunStatus.QUEUED
    assert not_due.status == RunStatus.WAITING
    assert (orphan.status, orphan.recoveries) == (RunStatus.QUEUED, 1)
    assert poison.status == RunStatus.FAILED and poison.error["type"] == "WorkerLost"


def test_an_idempotency_key_returns_the_existing_run():
    first, created = services.run_trigger(task_id="t-typed", payload={"name": "a"}, idempotency_key="k1")
    again, created_again = services.run_trigger(task_id="t-typed", payload={"name": "b"}, idempotency_key="k1")
    assert created and not created_again
    assert again.id == first.id
    other, _ = services.run_trigger(task_id="t-typed", payload={"name": "a"}, idempotency_key="k2")
    assert other.id != first.id


def test_an_expired_idempotency_key_starts_a_new_run():
    first, _ = services.run_trigger(task_id="t-typed", payload={"name": "a"}, idempotency_key="k")
    Run.objects.filter(pk=first.pk).update(idempotency_expires_at=timezone.now() - timedelta(seconds=1))
    second, created = services.run_trigger(task_id="t-typed", payload={"name": "a"}, idempotency_key="k")
    assert created and second.id != first.id


def test_a_step_commits_with_one_statement(django_assert_num_queries):
    """The hot path: a claim, then one statement per step (lease proof + insert, committed before ctx.step
    returns), then the settle: n steps cost n + 2 statements in all."""
    run = Run.objects.create(task_id="u-loop", payload={"n": 5})
    with engine.enqueue_to(lambda run_id: None), django_assert_num_queries(1 + 5 + 1):
        engine.run_execute(run.id, heartbeat=False)
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED
    assert Step.objects.filter(run=run).count() == 5


def test_sleep_parks_the_run_and_resumes_after_it(ledger):
    run = Run.objects.create(task_id="t-sleep", payload={"ledger": str(ledger), "seconds": 3600})
    with engine.enqueue_to(lambda run_id: None):
        assert engine.run_execute(run.id, heartbeat=False) == RunStatus.WAITING
    run.refresh_from_db()
    nap = run.steps.get(key="nap")
    assert (run.status, nap.status) == (RunStatus.WAITING, StepStatus.WAITING)
    assert run.wake_at == nap.wake_at
    assert timedelta(minutes=59) < run.wake_at - timezone.now() <= timedelta(hours=1)
    assert run.lease_owner == "" and run.lease_expires_at is None
    run = drive(run)  # time travel: the timer fires at once
    assert run.status == RunStatus.COMPLETED
    assert ledger_lines(ledger) == ["before", "after"]
    nap.refresh_from_db()
    assert nap.status == StepStatus.COMPLETED and nap.started_at < nap.finished_at


def test_an_idle_scheduler_tick_is_one_query(django_assert_num_queries):
    with django_assert_num_queries(1):
        result = engine.scheduler_tick()
    assert result.total == 0 and not result.schedules_due


def test_the_tick_says_when_a_cron_schedule_is_due():
    from runs.models import Schedule

    Schedule.objects.create(task_id="t-typed", cron="* * * * *", next_run_at=timezone.now() - timedelta(seconds=1))
    assert engine.scheduler_tick().schedules_due


def test_fork_from_a_step_reuses_earlier_steps_and_runs_from_it(ledger):
    run = run_task("t-ten-steps", {"ledger": str(ledger), "steps": 4})
    assert ledger_lines(ledger) == ["s1", "s2", "s3", "s4"]
    fork = services.run_fork(run=run, step_key="s3", output=100, by=Actor.system("tests"))
    fork = drive(fork)
    assert fork.status == RunStatus.COMPLETED and fork.replay_of_id == run.id
    # s1 and s2 were reused (s2 with its edited output); s3 and s4 ran again.
    assert ledger_lines(ledger) == ["s1", "s2", "s3", "s4", "s3", "s4"]
    assert fork.output == {"total": 1 + 100 + 3 + 4}
    with pytest.raises(services.RunStateError):
        services.run_fork(run=run, step_key="nope", by=Actor.system("tests"))


def test_a_line_logged_outside_steps_is_stored_once_however_often_the_code_re_runs():
    """Agent code outside steps re-runs on every execution; a line it logged (say, flushed by the heartbeat
    before the worker died) carries its position in the code, and the same position is stored once."""
    run = Run.objects.create(task_id="t-ten-steps", payload={"ledger": "x"})
    claim = engine.run_claim(run.id, worker="a")
    line = {"step_key": "", "ts": timezone.now().isoformat(), "level": "INFO", "message": "hi", "origin": "3.1"}
    for _ in range(2):  # two executions reach the same line
        buffer = engine.Buffer()
        buffer.logs.append(dict(line))
        assert engine.fenced_write(claim, buffer) is not None
    inside = {**line, "step_key": "s1", "origin": None}  # a step's own lines belong to its attempts: all kept
    for _ in range(2):
        buffer = engine.Buffer()
        buffer.logs.append(dict(inside))
        engine.fenced_write(claim, buffer)
    assert list(run.logs.values_list("step_key", "message")) == [("", "hi"), ("s1", "hi"), ("s1", "hi")]


def test_a_line_logged_outside_steps_while_replaying_recorded_steps_is_not_stored_again(ledger):
    """The code before a recorded step already logged its lines the first time through."""
    run = run_task("t-logs-between", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED and run.executions == 2  # parked once
    assert list(run.logs.filter(step_key="").values_list("message", flat=True)) == ["before the nap", "after it"]


def _prepared() -> list[str]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cur.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_the_hot_statements_are_prepared_once_per_connection():
    """A step's fenced statement is planned once per connection, not on every step."""
    from django.db import connection

    connection.close()  # a new session: nothing prepared yet
    run = Run.objects.create(task_id="u-loop", payload={"n": 5})
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    fenced = [s for s in _prepared() if s.lstrip().startswith("WITH lease AS")]
    assert len(fenced) == 1  # the five steps' one statement; the settle ran once, so it wasn't prepared


@pytest.mark.django_db(transaction=True)
def test_behind_a_transaction_mode_pooler_nothing_is_prepared(settings):
    from django.db import connection

    settings.DEX_DB_POOLER = "transaction"
    connection.close()
    run = Run.objects.create(task_id="u-loop", payload={"n": 5})
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    assert Run.objects.get(pk=run.pk).status == RunStatus.COMPLETED
    assert _prepared() == []


def test_a_child_ending_while_its_parent_parks_again_still_wakes_the_parent(monkeypatch):
    """A map's parent woken by its first child reads its children, finds one unfinished and parks again; if
    that child ends between the read and the park, its wake-up finds the parent running and does nothing, so
    the park itself must notice (or the parent waits forever: seen in the e2e suite with two children)."""
    from runs.engine import pauses

    parent, _ = services.run_trigger(task_id="t-parent", payload={"n": 2})
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(parent.id, worker="test", heartbeat=False)
        first, second = Run.objects.filter(parent=parent).order_by("created_at", "id")
        engine.run_execute(first.id, worker="test", heartbeat=False)
        parent.refresh_from_db()
        assert parent.status == RunStatus.QUEUED  # the first child's end woke it

        read = pauses.children_outcomes

        def second_ends_right_after_the_read(children: list[str]):
            outcomes = read(children)
            engine.run_execute(second.id, worker="test", heartbeat=False)  # settles, wakes nobody: parent runs
            return outcomes

        monkeypatch.setattr(pauses, "children_outcomes", second_ends_right_after_the_read)
        engine.run_execute(parent.id, worker="test", heartbeat=False)
        monkeypatch.undo()

    second.refresh_from_db()
    parent.refresh_from_db()
    assert second.status == RunStatus.COMPLETED
    assert parent.status == RunStatus.QUEUED, "the parent parked on children that had all ended"
    assert drive(parent).status == RunStatus.COMPLETED
    assert parent.output["squares"] == [0, 1]
