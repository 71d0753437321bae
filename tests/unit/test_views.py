"""The dashboard's minimal pages: login, the run list and the run page (first render; pushes are in
test_consumers.py)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from runs.models import LogLine, Run, RunStatus, Step, StepStatus

pytestmark = pytest.mark.django_db

PASSWORD = "pw-viewer-123"


@pytest.fixture
def user() -> Any:
    return get_user_model().objects.create_user("viewer", password=PASSWORD)


@pytest.fixture
def viewer(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def make_run(**fields: Any) -> Run:
    fields.setdefault("task_id", "t-ten-steps")
    fields.setdefault("status", RunStatus.RUNNING)
    return Run.objects.create(**fields)


@pytest.mark.parametrize("path", ["/", "/runs/{run}/"])
def test_it_sends_anonymous_visitors_to_the_login_page(client: Client, path: str) -> None:
    run = make_run()
    url = path.format(run=run.pk)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={url}"


def test_it_logs_in_with_username_and_password_and_out_with_a_post(client: Client, user: Any) -> None:
    page = client.get("/login/").content.decode()
    assert 'name="username"' in page and 'name="password"' in page

    response = client.post("/login/", {"username": "viewer", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200

    assert client.get("/logout/").status_code == 405
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_the_run_list_shows_the_newest_runs_live(viewer: Client) -> None:
    runs = [make_run(task_id=f"task-{i}") for i in range(3)]
    page = viewer.get("/").content.decode()
    assert 'ws-connect="/ws/runs/"' in page and 'hx-ext="ws"' in page
    newest_first = sorted(runs, key=lambda run: run.pk, reverse=True)  # uuid7: id order is creation order
    positions = [page.index(f'id="run-{run.pk}"') for run in newest_first]
    assert positions == sorted(positions)
    assert "hx-swap-oob" not in page


def test_the_run_list_says_when_there_are_no_runs(viewer: Client) -> None:
    assert 'id="runs-empty"' in viewer.get("/").content.decode()


def test_the_pages_load_htmx_and_its_ws_extension_from_our_static_files(viewer: Client) -> None:
    page = viewer.get("/").content.decode()
    assert '<script src="/static/django_htmx/htmx-2.min.js"' in page
    assert '<script src="/static/django_htmx/ext/hx-ws-2.min.js"' in page
    assert "https://" not in page
    assert 'hx-headers=\'{"x-csrftoken": "' in page


def test_the_run_page_shows_the_run_its_steps_errors_logs_and_metadata(viewer: Client) -> None:
    now = timezone.now()
    run = make_run(
        status=RunStatus.FAILED,
        payload={"topic": "<script>alert(1)</script>"},
        error={"type": "ValueError", "message": "the step is broken", "step": "bad", "traceback": "Traceback (x)"},
        metadata={"progress": 0.5},
        started_at=now,
        finished_at=now,
    )
    ok = Step.objects.create(
        run=run, seq=0, key="ok", status=StepStatus.COMPLETED, output=1, started_at=now, finished_at=now
    )
    bad = Step.objects.create(
        run=run,
        seq=1,
        key="bad",
        status=StepStatus.FAILED,
        attempts=2,
        error={"type": "ValueError", "message": "the step is broken", "traceback": "Traceback (bad 2)"},
        history=[
            {"attempt": 1, "error": {"type": "ValueError", "message": "first", "traceback": "Traceback (bad 1)"}},
            {"attempt": 2, "error": {"type": "ValueError", "message": "second", "traceback": "Traceback (bad 2)"}},
        ],
    )
    LogLine.objects.create(run=run, step_key="ok", ts=now, level="WARNING", message="<i>careful</i>")

    page = viewer.get(f"/runs/{run.pk}/").content.decode()

    assert f'ws-connect="/ws/runs/{run.pk}/"' in page
    assert f'id="run-{run.pk}-header"' in page and "Failed" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert f'id="step-{ok.pk}"' in page and f'id="step-{bad.pk}"' in page
    assert "attempt 1 failed: ValueError: first" in page and "attempt 2 failed: ValueError: second" in page
    inspected = viewer.get(f"/runs/{run.pk}/?step=bad").content.decode()  # tracebacks: in the step inspector
    assert "Traceback (bad 1)" in inspected and "Traceback (bad 2)" in inspected
    assert "&lt;i&gt;careful&lt;/i&gt;" in page
    assert "progress" in page


def test_the_run_page_of_an_unknown_run_is_404(viewer: Client) -> None:
    assert viewer.get(f"/runs/{uuid.uuid4()}/").status_code == 404
