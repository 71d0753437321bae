"""Bounds on runs (issue 12, DESIGN §3): a task without max_duration gets DEX_DEFAULT_MAX_DURATION, and the example
agents declare bounds on their inputs, so an absurd input (`steps=10**29`) is refused at the door — by the API
and by the dashboard's trigger form — instead of becoming a run that holds a worker until someone notices."""

from __future__ import annotations

import json
import time

import pytest
from django.test import Client

from runs.models import ApiKey, Run, RunStatus
from runs.sdk import Retry, task
from runs.sdk.registry import registry
from runs.testing import run_task

pytestmark = pytest.mark.django_db


def _tick(i: int) -> int:
    time.sleep(0.2)
    return i


@task("t-unbounded-loop", retry=Retry(attempts=1))
def unbounded_loop(ctx, steps: int = 50) -> int:
    return sum(ctx.step("tick", _tick, i) for i in range(steps))


def test_a_task_without_max_duration_gets_the_default(settings) -> None:
    settings.DEX_DEFAULT_MAX_DURATION = 0.5
    run = run_task("t-unbounded-loop", {"steps": 50})
    assert run.status == RunStatus.TIMED_OUT
    assert "DEX_DEFAULT_MAX_DURATION (0.5s; the task sets no max_duration)" in run.error["message"]
    assert 1 <= run.steps.count() < 50


def test_zero_means_no_default_and_a_task_s_own_max_duration_wins(settings) -> None:
    settings.DEX_DEFAULT_MAX_DURATION = 0
    assert registry.get("t-unbounded-loop").deadline_seconds is None
    assert run_task("t-unbounded-loop", {"steps": 3}).status == RunStatus.COMPLETED
    settings.DEX_DEFAULT_MAX_DURATION = 0.001
    assert registry.get("t-max-duration").deadline_seconds == 1.0  # its own, not the default


def test_the_api_shows_the_deadline_a_task_s_runs_get(settings) -> None:
    settings.DEX_DEFAULT_MAX_DURATION = 3600
    _key, secret = ApiKey.generate(name="bounds")
    client = Client(headers={"authorization": f"Bearer {secret}"})
    assert client.get("/api/tasks/t-unbounded-loop").json()["max_duration"] == 3600
    assert client.get("/api/tasks/t-max-duration").json()["max_duration"] == 1.0


# --- the example agents' input bounds -----------------------------------------------------------------------

ABSURD = [
    ("hello-steps", {"steps": 10**29}, ["payload", "steps"]),
    ("hello-steps", {"steps": 0}, ["payload", "steps"]),
    ("hello-steps", {"delay": 1e9}, ["payload", "delay"]),
    ("hello-steps", {"name": "x" * 10_000}, ["payload", "name"]),
    ("flaky-pipeline", {"records": 10**12}, ["payload", "records"]),
    ("flaky-pipeline", {"failure_rate": 7}, ["payload", "failure_rate"]),
    ("research-agent", {"topic": "x", "depth": 10**6}, ["payload", "depth"]),
    ("research-agent", {"topic": "x", "urls": [f"https://example.com/{i}" for i in range(50)]}, ["payload", "urls"]),
    ("fan-out-summariser", {"documents": ["doc"] * 10_000}, ["payload", "documents"]),
    ("fan-out-summariser", {"documents": ["x" * 100_001]}, ["payload", "documents"]),
    ("booking-saga", {"trip": ""}, ["payload", "trip"]),
    ("triage-agent", {"message": "x" * 20_000}, ["payload", "message"]),
]


@pytest.mark.parametrize("task_id, payload, loc", ABSURD)
def test_the_api_refuses_absurd_input_to_an_example_agent(task_id: str, payload: dict, loc: list) -> None:
    _key, secret = ApiKey.generate(name="bounds")
    client = Client(headers={"authorization": f"Bearer {secret}"})
    response = client.post(
        f"/api/tasks/{task_id}/trigger", json.dumps({"payload": payload}), content_type="application/json"
    )
    assert response.status_code == 422, response.content
    assert response.json()["error"]["details"][0]["loc"] == loc
    assert not Run.objects.exists()


def test_the_dashboard_refuses_absurd_input_with_a_form_error(operator: Client) -> None:
    response = operator.post("/tasks/hello-steps/", {"payload-name": "Ada", "payload-steps": str(10**29)})
    assert response.status_code == 422
    assert "less than or equal to 100" in response.content.decode()
    assert not Run.objects.exists()


def test_sensible_input_still_triggers(operator: Client) -> None:
    response = operator.post("/tasks/hello-steps/", {"payload-name": "Ada", "payload-steps": "3"})
    assert response.status_code == 302
    assert Run.objects.get().payload == {"name": "Ada", "steps": 3, "delay": 0.3}


@pytest.mark.parametrize("delay", ["1e300", "999999999999"])
def test_a_trigger_form_refuses_a_delay_no_date_can_hold(operator: Client, delay: str) -> None:
    """Found by the form fuzzer: the delay overflowed the run's wake-up time."""
    response = operator.post("/tasks/t-typed/", {"payload-name": "ok", "run-delay": delay})
    assert response.status_code == 422
    assert "less than or equal to" in response.content.decode()
    assert not Run.objects.exists()
