"""Alerts end to end: a run fails on a real worker process, which sends one signed webhook to a local
receiver (retrying after the receiver's 500) and an email (the console backend: it lands in the worker's log).
And the operator CLI's `trigger --wait` against a real worker."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from runs import services
from runs.models import Alert, AlertDelivery, AlertDeliveryStatus, AlertDestination, Run, RunStatus
from runs.ops import alerts
from tests.conftest import wait_for
from tests.webhooks import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SECRET = "whsec_worker-test"


def test_a_failing_run_sends_one_signed_webhook_retried_after_a_500_and_an_email(processes, ledger) -> None:
    with Receiver(statuses=[500]) as receiver:
        AlertDestination.objects.create(kind="webhook", target=receiver.url, secret=SECRET)
        AlertDestination.objects.create(kind="email", target="oncall@example.com")
        worker = processes.worker(
            DEX_ALERT_RETRY_INITIAL_SECONDS="0.3",
            DEX_ALERT_ALLOW_PRIVATE_HOSTS="127.0.0.1",  # the receiver listens on loopback
            DEX_EMAIL_BACKEND="django.core.mail.backends.console.EmailBackend",
        )
        # The retry after the 500 is sent by the scheduler's alert scan once its back-off is over.
        processes.scheduler(DEX_ALERT_SCAN_SECONDS="0.2", DEX_ALERT_ALLOW_PRIVATE_HOSTS="127.0.0.1")
        run, _ = services.run_trigger(task_id="t-fails", payload={"ledger": str(ledger), "nonretriable": True})

        webhook = AlertDelivery.objects.filter(alert__run=run, channel="webhook")
        delivered = wait_for(
            lambda: webhook.filter(status=AlertDeliveryStatus.DELIVERED).first(), what="the webhook to be delivered"
        )
        run.refresh_from_db()
        assert run.status == RunStatus.FAILED
        assert delivered.attempts == 2
        assert [h["status"] for h in delivered.history] == [500, 200]
        assert receiver.count() == 2  # the 500, then the one delivered webhook

        first, second = receiver.requests
        assert first.body == second.body  # the same alert, signed afresh on each attempt
        assert first.headers["Dex-Delivery"] == second.headers["Dex-Delivery"] == str(delivered.pk)
        assert alerts.signature_verify(SECRET, second.headers["Dex-Signature"], second.body)
        body = json.loads(second.body)
        assert body["type"] == "run.failed"
        assert body["run"]["id"] == str(run.pk) and body["run"]["task"] == "t-fails"
        assert body["run"]["error"]["message"] == "this input can never work"

        email = wait_for(
            lambda: AlertDelivery.objects.filter(alert__run=run, channel="email", status="delivered").first(),
            what="the email to be delivered",
        )
        assert email.attempts == 1
        worker.wait_for_log("Subject: [Dex] t-fails run failed")
        assert "Error: NonRetriableError: this input can never work" in worker.log()
        assert Alert.objects.filter(run=run).count() == 1


def test_the_scheduler_raises_the_alert_of_a_run_that_failed_without_its_worker(processes) -> None:
    """A dead-lettered run (its worker died too often) is failed by the scheduler, not settled by a worker: the
    scheduler's alert scan raises its alert and queues the delivery (which a worker sends, as above)."""
    AlertDestination.objects.create(kind="email", target="oncall@example.com")
    processes.scheduler(DEX_ALERT_SCAN_SECONDS="0.2")
    run = Run.objects.create(
        task_id="t-ten-steps",
        status=RunStatus.FAILED,
        finished_at=timezone.now(),
        error={"type": "WorkerLost", "message": "the worker executing this run died 5 times; dead-lettered"},
    )
    alert = wait_for(lambda: Alert.objects.filter(run=run).first(), what="the scheduler to raise the alert")
    assert alert.kind == "failed" and alert.payload["run"]["error"]["type"] == "WorkerLost"
    assert list(alert.deliveries.values_list("channel", "target", "status")) == [
        ("email", "oncall@example.com", "pending")
    ]


def test_the_cli_triggers_and_waits_for_a_run_on_a_real_worker(processes, ledger) -> None:
    processes.worker()
    out = StringIO()
    call_command(
        "dex", "trigger", "t-ten-steps", "--payload", json.dumps({"ledger": str(ledger)}), "--wait", stdout=out
    )
    run_id, output = out.getvalue().split("\n", 1)
    assert Run.objects.get(pk=run_id).status == RunStatus.COMPLETED
    assert json.loads(output) == {"total": 55}

    with pytest.raises(CommandError, match="ended failed: NonRetriableError: this input can never work"):
        payload = json.dumps({"ledger": str(ledger), "nonretriable": True})
        call_command("dex", "trigger", "t-fails", "--payload", payload, "--wait", stdout=StringIO())
