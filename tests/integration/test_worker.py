"""The engine end to end: a real Celery worker process, the real scheduler, the test database."""

from __future__ import annotations

import pytest

from runs import services
from runs.models import Run, RunStatus
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def finished(run: Run, timeout: float = 30) -> Run:
    def done() -> Run | None:
        run.refresh_from_db()
        return run if run.is_terminal else None

    return wait_for(done, timeout=timeout, what=f"run {run.id} to finish")


def test_it_runs_ten_steps_to_completion(processes, ledger):
    processes.worker()
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger)})
    finished(run)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"total": 55}
    assert ledger_lines(ledger) == [f"s{i}" for i in range(1, 11)]
    assert list(run.steps.values_list("key", flat=True)) == [f"s{i}" for i in range(1, 11)]


def test_it_retries_only_the_failed_step(processes, ledger):
    processes.worker()
    processes.scheduler()
    run, _ = services.run_trigger(task_id="t-flaky", payload={"ledger": str(ledger), "failures": 2})
    finished(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert ledger_lines(ledger) == [
        "before",
        "flaky attempt 1",
        "flaky attempt 2",
        "flaky attempt 3",
        "after",
    ]
    step = run.steps.get(key="flaky")
    assert step.attempts == 3
    assert [h["error"]["message"] for h in step.history] == ["boom on attempt 1", "boom on attempt 2"]


def test_sigkill_mid_step_resumes_after_the_lease_without_repeating_committed_steps(processes, ledger):
    worker = processes.worker()
    processes.scheduler()
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.4})
    # Kill the worker (and its pool child) while step 5 is in flight.
    wait_for(lambda: "s5" in ledger_lines(ledger), what="step 5 to start")
    worker.kill()
    assert not Run.objects.get(pk=run.pk).is_terminal
    processes.worker(name="replacement")
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"total": 55}
    lines = ledger_lines(ledger)
    for i in (1, 2, 3, 4, 6, 7, 8, 9, 10):
        assert lines.count(f"s{i}") == 1, lines
    assert lines.count("s5") == 2  # the in-flight step ran again: it had not committed
    assert run.recoveries == 1


def test_a_duplicate_delivery_changes_nothing(processes, ledger):
    from runs.tasks import execute_run

    processes.worker(concurrency=2)
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.05})
    for _ in range(3):
        execute_run.delay(str(run.id))
    finished(run)
    assert run.status == RunStatus.COMPLETED
    assert ledger_lines(ledger) == [f"s{i}" for i in range(1, 11)]
    assert run.executions == 1
    # A message arriving after the run finished is acknowledged and ignored.
    execute_run.delay(str(run.id))
    run.refresh_from_db()
    assert run.executions == 1


def test_two_workers_racing_for_one_run_give_it_one_owner(processes, ledger):
    from runs.tasks import execute_run

    processes.worker(name="left", concurrency=2)
    processes.worker(name="right", concurrency=2)
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.05})
    for _ in range(6):
        execute_run.delay(str(run.id))
    finished(run)
    assert run.status == RunStatus.COMPLETED
    assert ledger_lines(ledger) == [f"s{i}" for i in range(1, 11)]
    assert run.executions == 1
    assert run.lease_token == 1


def test_a_step_returning_non_json_fails_the_run_with_a_readable_error(processes):
    processes.worker()
    run, _ = services.run_trigger(task_id="t-bad-output", payload={"kind": "object"})
    finished(run)
    assert run.status == RunStatus.FAILED
    assert run.error["step"] == "make"
    assert "can't be stored as JSON" in run.error["message"]


def test_an_oversized_step_output_fails_the_run_with_a_readable_error(processes):
    processes.worker()
    run, _ = services.run_trigger(task_id="t-bad-output", payload={"kind": "huge"})
    finished(run)
    assert run.status == RunStatus.FAILED
    assert "over the limit" in run.error["message"]


def test_cancel_of_a_running_run_starts_no_step_after_it(processes, ledger):
    processes.worker()
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.3})
    wait_for(lambda: "s3" in ledger_lines(ledger), what="step 3 to start")
    services.run_cancel(run=Run.objects.get(pk=run.pk), by=Actor.system("tests"))
    cancelled_after = len(ledger_lines(ledger))
    finished(run)
    assert run.status == RunStatus.CANCELED
    # The step in flight when the cancel landed may finish; none starts after it.
    assert len(ledger_lines(ledger)) <= cancelled_after
    assert run.steps.count() <= cancelled_after


def test_cancel_of_a_run_waiting_for_its_retry_takes_effect_at_once(processes, ledger):
    processes.worker()
    run, _ = services.run_trigger(task_id="t-flaky", payload={"ledger": str(ledger), "failures": 100})
    wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.WAITING, what="the retry back-off")
    services.run_cancel(run=Run.objects.get(pk=run.pk), by=Actor.system("tests"))
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELED


def test_the_same_idempotency_key_returns_the_same_run(processes, ledger):
    processes.worker()
    payload = {"ledger": str(ledger)}
    first, created = services.run_trigger(task_id="t-ten-steps", payload=payload, idempotency_key="order-42")
    second, created_again = services.run_trigger(task_id="t-ten-steps", payload=payload, idempotency_key="order-42")
    assert created and not created_again
    assert second.id == first.id
    finished(first)
    assert ledger_lines(ledger) == [f"s{i}" for i in range(1, 11)]
