"""Every operator action is audited where it happens — in the service — whichever door it came through: the
dashboard, the API, the admin or the CLI (DESIGN §3)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from runs import engine
from runs.models import ApiKey, AuditEntry, Run, RunStatus
from runs.testing import drive
from tests.conftest import persona

pytestmark = pytest.mark.django_db


def failed_run() -> Run:
    return Run.objects.create(task_id="t-typed", status=RunStatus.FAILED, payload={"name": "x"})


def queued_run() -> Run:
    return Run.objects.create(task_id="t-typed", status=RunStatus.QUEUED, payload={"name": "x"})


def only_entry(action: str) -> AuditEntry:
    (entry,) = AuditEntry.objects.filter(action=action)
    return entry


@pytest.fixture
def api() -> Client:
    _key, secret = ApiKey.generate(name="ci-bot")
    return Client(headers={"authorization": f"Bearer {secret}"})


def api_post(client: Client, url: str, body: Any = None) -> Any:
    return client.post(url, data=json.dumps(body or {}), content_type="application/json")


# --- the API -------------------------------------------------------------------------------------------------


def test_it_audits_a_cancel_retry_and_replay_made_through_the_api(api: Client) -> None:
    key = ApiKey.objects.get(name="ci-bot")
    queued, failed = queued_run(), failed_run()

    assert api_post(api, f"/api/runs/{queued.pk}/cancel").status_code == 200
    assert api_post(api, f"/api/runs/{failed.pk}/retry").status_code == 200
    response = api_post(api, f"/api/runs/{queued.pk}/replay")
    assert response.status_code == 201

    cancel, retry, replay = only_entry("cancel"), only_entry("retry"), only_entry("replay")
    assert cancel.run_ids == [queued.pk] and retry.run_ids == [failed.pk]
    assert [str(r) for r in replay.run_ids] == [str(queued.pk), response.json()["id"]]
    for entry in (cancel, retry, replay):
        assert entry.username == "api-key:ci-bot" and entry.user is None
        assert entry.detail["via"] == "api" and entry.detail["api_key"] == key.prefix


def test_an_action_the_run_refuses_leaves_no_audit_entry(api: Client) -> None:
    done = Run.objects.create(task_id="t-typed", status=RunStatus.COMPLETED, payload={"name": "x"})
    assert api_post(api, f"/api/runs/{done.pk}/cancel").status_code == 409
    assert api_post(api, f"/api/runs/{done.pk}/retry").status_code == 409
    assert not AuditEntry.objects.exists()


def test_it_audits_an_approval_answered_through_the_api_with_the_key_as_approver(api: Client) -> None:
    run = Run.objects.create(task_id="t-approval", payload={"order": "A-7"})
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING
    wp = run.waitpoints.get()
    answer = api_post(api, f"/api/waitpoints/{wp.token}/complete", {"data": {"approved": False, "comment": "no"}})
    assert answer.status_code == 200

    entry = only_entry("reject")
    assert entry.run_ids == [run.pk] and entry.detail["comment"] == "no" and entry.detail["via"] == "api"
    assert drive(run).output["answer"]["approved"] is False


# --- the dashboard -------------------------------------------------------------------------------------------


def test_it_audits_the_dashboards_cancel_and_retry_with_the_operator(operator: Client, operator_user: Any) -> None:
    queued, failed = queued_run(), failed_run()
    assert operator.post(f"/runs/{queued.pk}/cancel/").status_code in (200, 302)
    assert operator.post(f"/runs/{failed.pk}/retry/").status_code in (200, 302)

    for action, run in (("cancel", queued), ("retry", failed)):
        entry = only_entry(action)
        assert entry.user == operator_user and entry.username == "operator"
        assert entry.run_ids == [run.pk] and entry.detail["via"] == "dashboard"


# --- the admin -----------------------------------------------------------------------------------------------


def test_it_audits_the_admins_retry_cancel_and_replay_actions() -> None:
    admin_user = persona("admin")
    client = Client()
    client.force_login(admin_user)
    failed, queued = failed_run(), queued_run()

    for action, run in (("retry_runs", failed), ("cancel_runs", queued), ("replay_runs", failed)):
        response = client.post("/admin/runs/run/", {"action": action, "_selected_action": [str(run.pk)]})
        assert response.status_code == 302

    assert only_entry("retry").run_ids == [failed.pk]
    assert only_entry("cancel").run_ids == [queued.pk]
    assert only_entry("replay").run_ids[0] == failed.pk
    assert {e.detail["via"] for e in AuditEntry.objects.all()} == {"admin"}
    assert {e.user for e in AuditEntry.objects.all()} == {admin_user}


# --- the CLI -------------------------------------------------------------------------------------------------


def test_it_audits_the_clis_cancel_and_retry_with_the_os_account() -> None:
    queued, failed = queued_run(), failed_run()
    call_command("dex", "cancel", str(queued.pk))
    call_command("dex", "retry", str(failed.pk))

    cancel, retry = only_entry("cancel"), only_entry("retry")
    assert cancel.run_ids == [queued.pk] and retry.run_ids == [failed.pk]
    for entry in (cancel, retry):
        assert entry.detail["via"] == "cli" and "os_user" in entry.detail
