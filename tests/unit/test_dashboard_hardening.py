"""Text Postgres can't store (NUL, lone surrogates) reaching the dashboard inside JSON — `"\\u0000"` and
`"\\ud800"` escapes parse fine — is a form error or a refusal that says why, never a database error (issue 12;
found by tests/unit/test_form_fuzz.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.utils import timezone

from runs.models import Event, Run, RunStatus, Step, StepStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def failed_run() -> Run:
    now = timezone.now()
    run = Run.objects.create(task_id="t-typed", status=RunStatus.FAILED, payload={"name": "a"}, finished_at=now)
    Step.objects.create(run=run, key="first", seq=0, status=StepStatus.COMPLETED, output=1, started_at=now)
    Step.objects.create(run=run, key="second", seq=1, status=StepStatus.FAILED, started_at=now)
    return run


@pytest.mark.parametrize(
    "payload, message",
    [('{"name": "x\\u0000"}', "text can't contain NUL"), ('{"name": "x\\ud800"}', "no lone surrogates")],
)
def test_a_replay_whose_payload_postgres_cannot_store_is_refused(
    operator: Client, failed_run: Run, payload: str, message: str
) -> None:
    response = operator.post(f"/runs/{failed_run.pk}/replay/", {"payload": payload})
    assert response.status_code == 302
    assert any(message in str(m) for m in get_messages(response.wsgi_request))
    assert Run.objects.count() == 1


@pytest.mark.parametrize("data", ['{"a": "\\u0000"}', '"\\ud800"', '{"\\u0000": 1}'])
def test_an_event_whose_data_postgres_cannot_store_is_a_form_error(operator: Client, data: str) -> None:
    response = operator.post("/events/", {"name": "order.paid", "data": data})
    assert response.status_code == 422
    page = response.content.decode()
    assert "text can&#x27;t contain NUL" in page or "no lone surrogates" in page
    assert not Event.objects.exists()


def test_a_trigger_form_refuses_a_nul_in_its_options(operator: Client) -> None:
    response: Any = operator.post("/tasks/t-typed/", {"payload-name": "ok", "run-idempotency_key": "k\x00"})
    assert response.status_code == 422
    assert not Run.objects.exists()
