"""Flow control at claim time (runs/engine/flow.py): the claim statements and their query counts, the reasons a run
waits, debounce at trigger time, the scheduler's re-send of rate-limited runs, the SDK's options."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

import tests.flow_agents  # noqa: F401  (registers the flow-control test tasks)
from runs import engine, services
from runs.engine import flow
from runs.models import Run, RunStatus
from runs.ops.audit import Actor, roles_ensure
from runs.sdk import task
from runs.testing import drive

pytestmark = pytest.mark.django_db


def trigger(task_id: str, payload: dict, **options: Any) -> Run:
    run, _ = services.run_trigger(task_id=task_id, payload=payload, **options)
    return run


def conc(n: int = 0, **extra: Any) -> dict:
    return {"ledger": "/dev/null", "n": n, **extra}


def test_it_claims_a_run_without_limits_in_one_query(django_assert_num_queries):
    run = trigger("t-ten-steps", {"ledger": "/dev/null"})
    assert (run.concurrency_key_value, run.rate_key_value) == (None, None)
    with django_assert_num_queries(1):
        claim = engine.run_claim(run.id, worker="w")
    assert claim is not None and claim.run_id == run.id


def test_it_claims_a_limited_run_under_a_lock_in_one_more_statement(django_assert_max_num_queries):
    run = trigger("t-flow-concurrency", conc())
    assert (run.concurrency_key_value, run.rate_key_value) == ("", None)
    # The probe, then the lock and the counting claim (plus the savepoint around them in a test).
    with django_assert_max_num_queries(5):
        claim = engine.run_claim(run.id, worker="w")
    assert claim is not None and claim.run_id == run.id and claim.token == 1
    run.refresh_from_db()
    assert (run.status, run.lease_owner, run.executions) == (RunStatus.RUNNING, "w", 1)


def test_over_the_limit_nothing_is_claimed_and_the_run_says_why(django_assert_max_num_queries):
    first, second, third = (trigger("t-flow-concurrency", conc(n)) for n in range(3))
    assert engine.run_claim(first.id, worker="w1") is not None
    assert engine.run_claim(second.id, worker="w2") is not None
    with django_assert_max_num_queries(7):
        assert engine.run_claim(third.id, worker="w3") is None
    third.refresh_from_db()
    assert third.status == RunStatus.QUEUED and third.executions == 0 and third.lease_owner == ""
    assert third.status_reason == "waiting for a concurrency slot (2/2 running)"
    assert third.wake_at is None


def test_a_wake_up_claims_the_best_waiting_run_of_its_group():
    low = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "low"}, priority=1)
    high = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "high"}, priority=7)
    older_mid = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "mid"}, priority=3)
    trigger("t-flow-priority", {"ledger": "/dev/null", "name": "mid-2"}, priority=3)
    claim = engine.run_claim(low.id, worker="w")  # the message named `low`; `high` goes first
    assert claim is not None and claim.run_id == high.id
    assert engine.run_claim(low.id, worker="w") is None  # concurrency 1: the slot is taken
    Run.objects.filter(pk=high.pk).update(status=RunStatus.COMPLETED)
    assert engine.run_claim(low.id, worker="w").run_id == older_mid.id


def test_keys_are_separate_groups():
    a1 = trigger("t-flow-per-user", conc(1, user={"id": 7}))
    a2 = trigger("t-flow-per-user", conc(2, user={"id": 7}))
    b1 = trigger("t-flow-per-user", conc(3, user={"id": "b"}))
    nobody = trigger("t-flow-per-user", conc(4, user={}))
    assert [r.concurrency_key_value for r in (a1, a2, b1, nobody)] == ["7", "7", "b", "null"]
    assert engine.run_claim(a1.id, worker="w").run_id == a1.id
    assert engine.run_claim(a2.id, worker="w") is None
    assert engine.run_claim(b1.id, worker="w").run_id == b1.id
    assert engine.run_claim(nobody.id, worker="w").run_id == nobody.id
    a2.refresh_from_db()
    assert a2.status_reason == "waiting for a concurrency slot (1/1 running for user.id=7)"


def test_a_rate_limited_run_waits_until_its_window_and_the_scheduler_resends_it():
    runs = [trigger("t-flow-rate", {"n": n}) for n in range(6)]
    for run in runs[:5]:
        assert engine.run_claim(run.id, worker="w") is not None
    assert engine.run_claim(runs[5].id, worker="w") is None
    sixth = Run.objects.get(pk=runs[5].pk)
    first_start = min(Run.objects.filter(pk__in=[r.pk for r in runs[:5]]).values_list("started_at", flat=True))
    assert sixth.status == RunStatus.QUEUED
    assert sixth.wake_at - first_start >= timedelta(seconds=2)
    assert sixth.status_reason.startswith("rate limited (5 per 2s) until ")

    sent: list[str] = []
    with engine.enqueue_to(sent.append):
        assert engine.scheduler_tick().resent == 0  # not yet: the window is closed
        Run.objects.filter(pk=sixth.pk).update(wake_at=timezone.now() - timedelta(seconds=1))
        assert engine.scheduler_tick().resent == 1
    sixth.refresh_from_db()
    assert sixth.wake_at is None and sent == []  # enqueued on commit of the test's transaction


def test_only_the_runs_that_fit_the_next_window_are_scheduled_for_it(django_capture_on_commit_callbacks):
    runs = [trigger("t-flow-rate", {"n": n}) for n in range(12)]
    sent: list[str] = []
    with engine.enqueue_to(sent.append), django_capture_on_commit_callbacks(execute=True):
        assert engine.run_claim(runs[0].id, worker="w").run_id == runs[0].id
    assert sent == [str(runs[1].id)]  # a start passes the turn to the next run of the group
    for run in runs[1:5]:
        assert engine.run_claim(run.id, worker="w") is not None
    assert engine.run_claim(runs[11].id, worker="w") is None
    assert engine.run_claim(runs[5].id, worker="w") is None  # a second refusal in the same window changes nothing
    waiting = list(Run.objects.filter(pk__in=[r.pk for r in runs[5:]]).order_by("id"))
    assert all(r.wake_at is not None and " until " in r.status_reason for r in waiting[:5])
    assert [(r.wake_at, r.status_reason) for r in waiting[5:]] == [(None, "rate limited (5 per 2s)")] * 2


def test_a_resumed_run_is_not_a_new_start_for_the_rate_limit():
    runs = [trigger("t-flow-rate", {"n": n}) for n in range(5)]
    for run in runs:
        assert engine.run_claim(run.id, worker="w") is not None
    # One parked and woke up: its claim is a resumption, which the window doesn't count.
    Run.objects.filter(pk=runs[0].pk).update(status=RunStatus.QUEUED, lease_owner="")
    assert engine.run_claim(runs[0].id, worker="w").run_id == runs[0].id


def test_settling_a_limited_run_hands_its_slot_to_the_best_waiting_run(django_capture_on_commit_callbacks):
    first = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "first"}, priority=10)
    low = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "low"}, priority=1)
    high = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "high"}, priority=2)
    sent: list[str] = []
    with engine.enqueue_to(sent.append), django_capture_on_commit_callbacks(execute=True):
        assert engine.run_execute(first.id, worker="w", heartbeat=False) == RunStatus.COMPLETED
    assert sent == [str(high.id)]  # one slot freed: one wake-up, for the best run
    assert Run.objects.get(pk=low.pk).status == RunStatus.QUEUED


def test_a_dead_lettered_run_hands_its_slot_on(settings, django_capture_on_commit_callbacks):
    dead = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "dead"}, priority=5)
    waiting = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "waiting"})
    assert engine.run_claim(dead.id, worker="w").run_id == dead.id
    Run.objects.filter(pk=dead.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1), recoveries=settings.DEX_MAX_RECOVERIES - 1
    )
    sent: list[str] = []
    with engine.enqueue_to(sent.append), django_capture_on_commit_callbacks(execute=True):
        assert engine.scheduler_tick().dead == 1
    assert sent == [str(waiting.id)]


def test_debounce_supersedes_the_pending_run_of_the_same_key():
    a = trigger("t-flow-debounce", {"user_id": 1, "text": "a"})
    other = trigger("t-flow-debounce", {"user_id": 2, "text": "x"})
    b = trigger("t-flow-debounce", {"user_id": 1, "text": "b"})
    a.refresh_from_db()
    other.refresh_from_db()
    assert (a.status, a.status_reason) == (RunStatus.CANCELED, f"debounced: superseded by a later trigger (run {b.pk})")
    assert a.finished_at is not None and a.wake_at is None
    assert other.status == RunStatus.DELAYED  # another key: its own window
    assert b.status == RunStatus.DELAYED and b.debounce_key_value == "1"
    assert timedelta(seconds=1.5) < b.wake_at - b.created_at <= timedelta(seconds=2.5)
    assert b.status_reason.startswith("debounced for user_id=1: starts at ")
    # The last one runs with its payload once the window passed.
    assert drive(b).output == "1: b"
    assert Run.objects.get(pk=b.pk).status_reason == ""


def test_a_child_run_is_never_debounced():
    parent = Run.objects.create(task_id="t-ten-steps")
    child = trigger("t-flow-debounce", {"user_id": 1, "text": "a"}, parent=parent)
    assert child.status == RunStatus.QUEUED and child.debounce_key_value is None


def test_the_dashboard_shows_why_a_run_waits():
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    roles_ensure()
    user.groups.add(Group.objects.get(name="viewer"))
    client = Client()
    client.force_login(user)
    runs = [trigger("t-flow-priority", {"ledger": "/dev/null", "name": str(n)}) for n in range(2)]
    engine.run_claim(runs[0].id, worker="w")
    engine.run_claim(runs[1].id, worker="w")
    reason = "waiting for a concurrency slot (1/1 running)"
    assert reason in client.get(f"/runs/{runs[1].pk}/").content.decode()
    assert reason in client.get("/").content.decode()


def test_the_api_says_why_a_run_waits_and_takes_a_priority():
    _key, secret = services.apikey_create(name="flow", by=Actor.system("tests"))
    api = Client(headers={"authorization": f"Bearer {secret}"})
    response = api.post(
        "/api/tasks/t-flow-priority/trigger",
        {"payload": {"ledger": "/dev/null", "name": "vip"}, "priority": 8},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["priority"], body["status_reason"]) == (8, "")
    blocker = trigger("t-flow-priority", {"ledger": "/dev/null", "name": "blocker"}, priority=9)
    assert engine.run_claim(blocker.id, worker="w").run_id == blocker.id
    assert engine.run_claim(body["id"], worker="w") is None
    run = api.get(f"/api/runs/{body['id']}").json()
    assert run["status_reason"] == "waiting for a concurrency slot (1/1 running)"


@pytest.mark.parametrize(
    ("payload", "path", "key"),
    [
        ({"user_id": 42}, "user_id", "42"),
        ({"user": {"id": "u-1"}}, "user.id", "u-1"),
        ({"items": [{"sku": "x"}]}, "items.0.sku", "x"),
        ({"user": None}, "user.id", "null"),
        ({}, "user_id", "null"),
        ({"a": 1}, None, ""),
        ({"tenant": {"b": 2, "a": 1}}, "tenant", '{"a": 1, "b": 2}'),
    ],
)
def test_it_resolves_a_key_from_the_payload(payload, path, key):
    assert flow.resolve_key(payload, path) == key


def test_a_very_long_key_is_stored_as_a_digest():
    key = flow.resolve_key({"k": "x" * 1000}, "k")
    assert key.startswith("sha256:") and len(key) < 255


def test_priority_maps_onto_the_brokers_scale(settings):
    settings.CELERY_BROKER_URL = "redis://localhost:6379/0"
    assert [flow.broker_priority(p) for p in (0, 1, 5, 9, 50, -3)] == [9, 8, 4, 0, 0, 9]
    settings.CELERY_BROKER_URL = "amqp://guest@localhost//"
    assert [flow.broker_priority(p) for p in (0, 1, 5, 50)] == [None, 1, 5, 9]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency_key": "user_id"}, "concurrency_key needs concurrency"),
        ({"rate_key": "user_id"}, "rate_key needs rate_limit"),
        ({"debounce_key": "user_id"}, "debounce_key needs debounce"),
        ({"rate_limit": (0, 10)}, r"rate_limit must be \(n, period\)"),
        ({"rate_limit": 5}, r"rate_limit must be \(n, period\)"),
        ({"debounce": timedelta(0)}, "debounce must be positive"),
    ],
)
def test_the_sdk_rejects_incomplete_flow_options(options, message):
    with pytest.raises(ValueError, match=message):
        task("t-flow-invalid", **options)(lambda ctx: None)
