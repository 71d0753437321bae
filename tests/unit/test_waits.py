"""Waiting for events and people, in-process (the run parks; events and tokens complete the wait)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs import engine, services
from runs.models import Run, RunStatus, StepStatus, Waitpoint
from runs.ops.audit import Actor
from runs.testing import drive, run_task
from tests.agents import ledger_lines

pytestmark = pytest.mark.django_db


def start(task_id: str, payload: dict) -> Run:
    run = Run.objects.create(task_id=task_id, payload=payload)
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    run.refresh_from_db()
    return run


def test_an_event_resumes_the_wait_with_its_data():
    run = start("t-wait-event", {"topic": "dex"})
    assert run.status == RunStatus.WAITING and run.wake_at is None
    assert run.steps.get(key="review").status == StepStatus.WAITING
    services.event_send(name="report.reviewed", data={"topic": "other", "ok": False})  # doesn't match
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING
    event, created = services.event_send(name="report.reviewed", data={"topic": "dex", "ok": True}, external_id="e1")
    assert created and event.outcome["resumed"] == [str(run.id)]
    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"verdict": {"topic": "dex", "ok": True}}


def test_an_event_id_received_twice_is_accepted_once():
    first = start("t-wait-event", {"topic": "a"})
    services.event_send(name="report.reviewed", data={"topic": "a", "n": 1}, external_id="same")
    second = start("t-wait-event", {"topic": "a"})  # waiting after the first delivery
    again, created = services.event_send(name="report.reviewed", data={"topic": "a", "n": 2}, external_id="same")
    assert not created and again.data == {"topic": "a", "n": 1}
    assert Run.objects.get(pk=second.pk).status == RunStatus.WAITING
    assert drive(first).output == {"verdict": {"topic": "a", "n": 1}}


def test_a_wait_that_times_out_resumes_with_none():
    run = start("t-wait-event", {"topic": "late", "timeout": 60})
    assert run.wake_at is not None
    Waitpoint.objects.filter(run=run).update(timeout_at=timezone.now() - timedelta(seconds=1))
    run = drive(run)
    assert run.output == {"verdict": None}
    # An event arriving after the timeout changes nothing.
    event, _ = services.event_send(name="report.reviewed", data={"topic": "late"})
    assert event.outcome["resumed"] == []


def test_an_approval_completed_by_token_resumes_with_the_answer_and_form_data():
    run = start("t-approval", {"order": "A-1"})
    wp = Waitpoint.objects.get(run=run)
    assert (wp.kind, wp.prompt) == ("approval", "Refund order A-1?")
    with pytest.raises(services.WaitpointError) as invalid:
        services.waitpoint_complete(
            token=wp.token, data={"approved": True, "data": {"amount": "-3"}}, by=Actor.system("tests")
        )
    assert invalid.value.status == 422
    assert {tuple(d["loc"]) for d in invalid.value.details} == {("data", "data", "amount"), ("data", "data", "reason")}
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING  # an invalid answer loses nothing
    services.waitpoint_complete(
        token=wp.token,
        data={"approved": True, "comment": "ok", "data": {"amount": "12.50", "reason": "late"}},
        by=Actor.system("tests"),
    )
    with pytest.raises(services.WaitpointError) as again:
        services.waitpoint_complete(token=wp.token, data={"approved": False}, by=Actor.system("tests"))
    assert again.value.status == 409
    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {
        "answer": {"approved": True, "by": "", "comment": "ok", "data": {"amount": "12.50", "reason": "late"}}
    }


def test_an_event_starts_the_tasks_subscribed_to_it():
    event, _ = services.event_send(name="user.signed_up", data={"email": "ada@example.com"})
    (run_id,) = event.outcome["started"]
    run = drive(Run.objects.get(pk=run_id))
    assert run.output == "welcome ada@example.com"
    # A payload the task can't take is recorded on the event, not lost silently.
    event, _ = services.event_send(name="user.signed_up", data={"nope": 1})
    assert event.outcome["started"] == [] and event.outcome["errors"][0]["task"] == "t-on-signup"


def test_map_fans_out_one_child_per_payload_and_fans_in_in_order():
    run = start("t-parent", {"n": 4})
    assert run.status == RunStatus.WAITING
    children = list(Run.objects.filter(parent=run).order_by("id"))
    assert len(children) == 4
    for child in children:
        drive(child)  # each child's end wakes the parent
    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"squares": [0, 1, 4, 9], "one": 49}


def test_invoke_of_a_failing_child_raises_child_run_failed_in_the_parent():
    run = run_task("t-parent", {"n": 1, "fail": True})
    assert run.status == RunStatus.COMPLETED
    assert run.output["one"] == "failed: child 7 refuses"


def test_a_failing_saga_runs_its_compensations_newest_first(ledger):
    run = run_task("t-saga", {"ledger": str(ledger), "fail_at": "car"})
    assert run.status == RunStatus.FAILED
    assert ledger_lines(ledger) == ["book flight", "book hotel", "book car", "cancel hotel-123", "cancel flight-123"]
    assert run.error["step"] == "car" and run.error["compensated"] == ["hotel", "flight"]
    assert list(run.steps.values_list("key", flat=True)) == [
        "flight",
        "hotel",
        "car",
        "compensate:hotel",
        "compensate:flight",
    ]
    # Executing it again (as after a crash mid-compensation) undoes nothing twice.
    Run.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED)
    assert drive(run).status == RunStatus.FAILED
    assert len(ledger_lines(ledger)) == 5


def test_cancelling_a_parent_cancels_its_waiting_children():
    from runs import services

    run = start("t-parent-sleepy-child", {})
    (child,) = Run.objects.filter(parent=run)
    drive_once(child)
    assert Run.objects.get(pk=child.pk).status == RunStatus.WAITING
    services.run_cancel(run=run, by=Actor.system("tests"))
    assert Run.objects.get(pk=child.pk).status == RunStatus.CANCELED
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELED


def drive_once(run: Run) -> None:
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
