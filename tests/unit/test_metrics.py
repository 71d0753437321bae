"""GET /metrics: Prometheus text read from the database at scrape time, for the token or staff only, in a
bounded number of queries."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from runs.models import AlertDelivery, AlertDestination, AlertKind, Run, RunStatus, Step, StepStatus
from runs.ops import alerts
from runs.ops.jsonlog import JsonFormatter
from runs.sdk import task
from runs.sdk.registry import registry
from runs.testing import run_task

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-123"


@pytest.fixture(autouse=True)
def token(settings) -> None:
    settings.DEX_METRICS_TOKEN = TOKEN


def _scrape(client: Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _seed() -> None:
    now = timezone.now()
    old = now - timedelta(minutes=10)
    for _ in range(2):
        Run.objects.create(task_id="research", status=RunStatus.QUEUED, queue="agents", enqueued_at=now)
    Run.objects.create(task_id="mailer", status=RunStatus.QUEUED, queue="dex", enqueued_at=now)
    Run.objects.filter(task_id="mailer").update(created_at=old)
    Run.objects.create(task_id="research", status=RunStatus.RUNNING, cost_usd=Decimal("0.25"))
    Run.objects.create(task_id="research", status=RunStatus.WAITING, cost_usd=Decimal("0.5"))
    Run.objects.create(task_id="mailer", status=RunStatus.DELAYED, wake_at=now + timedelta(hours=1))
    for _ in range(3):
        Run.objects.create(task_id="mailer", status=RunStatus.COMPLETED, finished_at=now)
    failed = Run.objects.create(task_id="mailer", status=RunStatus.FAILED, finished_at=now, cost_usd=Decimal("1.0"))
    for seq, seconds in enumerate((1, 2, 3, 4, 10)):
        Step.objects.create(
            run=failed,
            seq=seq,
            key=f"s{seq}",
            status=StepStatus.COMPLETED,
            started_at=now - timedelta(seconds=seconds),
            finished_at=now,
        )
    Step.objects.create(  # settled long ago: outside the window
        run=failed,
        seq=9,
        key="old",
        status=StepStatus.COMPLETED,
        started_at=old,
        finished_at=old + timedelta(minutes=1),
    )
    AlertDestination.objects.create(kind="email", target="oncall@example.com")
    alerts.alert_raise(run=failed, kind=AlertKind.FAILED)


def test_it_reports_runs_queues_steps_cost_and_alerts(client: Client, django_assert_max_num_queries) -> None:
    _seed()
    with django_assert_max_num_queries(5):
        m = _scrape(client)

    assert m[("dex_runs", (("status", "queued"), ("task", "research")))] == 2
    assert m[("dex_runs", (("status", "queued"), ("task", "mailer")))] == 1
    assert m[("dex_runs", (("status", "running"), ("task", "research")))] == 1
    assert m[("dex_runs", (("status", "waiting"), ("task", "research")))] == 1
    assert m[("dex_runs", (("status", "delayed"), ("task", "mailer")))] == 1
    assert m[("dex_runs_created_24h", (("status", "completed"), ("task", "mailer")))] == 3
    assert m[("dex_runs_created_24h", (("status", "failed"), ("task", "mailer")))] == 1
    assert m[("dex_runs_created_24h", (("status", "queued"), ("task", "research")))] == 2
    assert ("dex_runs_created_24h", (("status", "completed"), ("task", "research"))) not in m
    assert m[("dex_parked_runs", ())] == 2

    assert m[("dex_queue_depth", (("queue", "agents"),))] == 2
    assert m[("dex_queue_depth", (("queue", "dex"),))] == 1
    assert 595 <= m[("dex_oldest_queued_run_age_seconds", (("queue", "dex"),))] <= 660

    assert m[("dex_steps_settled_recent", (("kind", "step"),))] == 5
    assert m[("dex_step_seconds_recent", (("kind", "step"),))] == pytest.approx(20, abs=0.5)
    assert m[("dex_step_duration_seconds_recent", (("kind", "step"), ("quantile", "0.5")))] == pytest.approx(3, abs=0.1)

    assert m[("dex_llm_cost_usd_24h", (("task", "research"),))] == pytest.approx(0.75)
    assert m[("dex_llm_cost_usd_24h", (("task", "mailer"),))] == pytest.approx(1.0)
    assert m[("dex_alert_deliveries_pending", ())] == AlertDelivery.objects.count() == 1


def test_an_empty_database_scrapes_cleanly(client: Client) -> None:
    m = _scrape(client)
    assert m[("dex_parked_runs", ())] == 0
    assert not any(name == "dex_runs_created_24h" for name, _ in m)


def test_it_refuses_anyone_else(client: Client, settings) -> None:
    response = client.get("/metrics")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 403

    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    client.force_login(user)
    assert client.get("/metrics").status_code == 403
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    assert client.get("/metrics").status_code == 200

    settings.DEX_METRICS_TOKEN = ""  # no token configured: no token opens it
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403


# --- structured logs (DEX_LOG_FORMAT=json) -----------------------------------------------------------------


def test_json_logs_carry_the_run_task_and_step() -> None:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    logger = logging.getLogger("tests.jsonlog")
    handler = Capture()
    logger.addHandler(handler)

    def say() -> int:
        logger.warning("charging %s", "card", extra={"order": 7})
        return 1

    t = task("t-jsonlog")(lambda ctx: ctx.step("charge", say))
    try:
        run = run_task(t)
        logger.info("outside any run")
    finally:
        registry.unregister(t.id)
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in lines)
    assert inside["message"] == "charging card" and inside["level"] == "WARNING" and inside["order"] == 7
    assert (inside["run_id"], inside["task"], inside["step"]) == (str(run.pk), "t-jsonlog", "charge")
    assert outside["message"] == "outside any run" and "run_id" not in outside
