"""POST /api/events and POST /api/waitpoints/{token}/complete, and pending waitpoints on a run."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import path

from runs import engine
from runs.api.views import api
from runs.models import ApiKey, Run, RunStatus, Waitpoint
from tests.unit.test_api import post

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

urlpatterns = [path("api/", api.urls)]


@pytest.fixture
def client() -> Client:
    _key, secret = ApiKey.generate(name="tests")
    return Client(headers={"authorization": f"Bearer {secret}"})


def parked(task_id: str, payload: dict[str, Any]) -> Run:
    run = Run.objects.create(task_id=task_id, payload=payload)
    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING
    return run


def test_it_resumes_a_waiting_run_with_an_event(client):
    run = parked("t-wait-event", {"topic": "dex"})
    response = post(client, "/api/events", {"name": "report.reviewed", "data": {"topic": "dex"}, "id": "ev-1"})
    assert response.status_code == 201
    assert response.json()["resumed"] == [str(run.id)]
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED
    duplicate = post(client, "/api/events", {"name": "report.reviewed", "data": {"topic": "dex"}, "id": "ev-1"})
    assert duplicate.status_code == 200 and duplicate.json()["duplicate"] is True


def test_an_event_needs_a_name_and_a_key(client):
    assert post(client, "/api/events", {"data": {}}).status_code == 422
    assert post(Client(), "/api/events", {"name": "x"}).status_code == 401


def test_a_run_lists_its_pending_approval_and_the_token_completes_it(client):
    run = parked("t-approval", {"order": "B-7"})
    (waitpoint,) = client.get(f"/api/runs/{run.id}").json()["waitpoints"]
    assert waitpoint["kind"] == "approval" and waitpoint["prompt"] == "Refund order B-7?"
    url = f"/api/waitpoints/{waitpoint['token']}/complete"
    invalid = post(client, url, {"data": {"approved": True, "data": {"amount": "ten"}}})
    assert invalid.status_code == 422
    assert ["data", "data", "amount"] in [d["loc"] for d in invalid.json()["error"]["details"]]
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING
    ok = post(client, url, {"data": {"approved": False, "comment": "no"}})
    assert ok.status_code == 200
    assert ok.json()["result"] == {"approved": False, "by": "api-key:tests", "comment": "no", "data": {}}
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED
    assert post(client, url, {"data": {"approved": True}}).status_code == 409
    assert client.get(f"/api/runs/{run.id}").json()["waitpoints"] == []


def test_an_unknown_token_is_a_404(client):
    assert post(client, "/api/waitpoints/nope/complete", {"data": {}}).status_code == 404
    assert not Waitpoint.objects.exists()


@pytest.mark.urls("dexweb.urls")
def test_an_unknown_api_path_is_a_json_404(client):
    response = client.get("/api/nothing/here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
