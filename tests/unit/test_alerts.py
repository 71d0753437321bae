"""Alerts: raised once per run and kind, delivered signed (webhook, to a real local HTTP receiver) or by email,
retried with back-off, re-raised by the scheduler's scan when lost, and managed on the Alerts page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core import mail
from django.db import connection
from django.test import Client
from django.utils import timezone

from runs.engine import waitpoint_create
from runs.models import (
    Alert,
    AlertDelivery,
    AlertDeliveryStatus,
    AlertDestination,
    AlertKind,
    AuditEntry,
    Run,
    RunStatus,
    WaitpointKind,
)
from runs.ops import alerts
from runs.sdk import task
from runs.sdk.registry import registry
from runs.testing import run_task
from tests.webhooks import Receiver

pytestmark = pytest.mark.django_db

SECRET = "whsec_test-secret"


@pytest.fixture(autouse=True)
def loopback_receivers_allowed(settings) -> None:
    """The receivers here listen on loopback, which alert webhooks may reach only when an operator says so."""
    settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS = ["127.0.0.1"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def viewer() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user("viewer", password="pw-viewer-123"))
    return client


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    user.user_permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    client = Client()
    client.force_login(user)
    return client


def _failed_run(task_id: str = "t-fails", **fields: Any) -> Run:
    now = timezone.now()
    return Run.objects.create(
        task_id=task_id,
        status=RunStatus.FAILED,
        started_at=now,
        finished_at=now,
        error={"type": "ValueError", "message": "the step is broken", "step": "bad"},
        **fields,
    )


def _due_now(delivery: AlertDelivery) -> None:
    AlertDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))


# --- raising ----------------------------------------------------------------------------------------------


def test_it_raises_one_alert_per_run_and_kind_when_a_run_fails(tmp_path, settings) -> None:
    settings.DEX_ALERT_EMAILS = ["oncall@example.com"]
    AlertDestination.objects.create(kind="webhook", target="http://127.0.0.1:9/hook", secret=SECRET)
    run = run_task("t-fails", {"ledger": str(tmp_path / "l"), "nonretriable": True})
    assert run.status == RunStatus.FAILED

    alert = Alert.objects.get(run=run)  # raised by the engine's settle hook
    assert alert.kind == AlertKind.FAILED
    assert alert.payload["type"] == "run.failed"
    assert alert.payload["run"]["error"]["message"] == "this input can never work"
    assert alert.payload["run"]["url"] == f"/runs/{run.pk}/"
    targets = sorted(alert.deliveries.values_list("channel", "target"))
    assert targets == [("email", "oncall@example.com"), ("webhook", "http://127.0.0.1:9/hook")]

    assert alerts.alert_raise(run=run, kind=AlertKind.FAILED) is None  # the second time: nothing
    assert Alert.objects.filter(run=run).count() == 1 and AlertDelivery.objects.count() == 2


def test_a_completed_run_raises_nothing(tmp_path) -> None:
    AlertDestination.objects.create(kind="email", target="ops@example.com")
    run = run_task("t-ten-steps", {"ledger": str(tmp_path / "l"), "steps": 1})
    assert run.status == RunStatus.COMPLETED
    assert not Alert.objects.exists()


def test_destinations_filter_by_event_kind_and_task_glob() -> None:
    AlertDestination.objects.create(kind="email", target="billing@example.com", task_filter="billing-*")
    AlertDestination.objects.create(kind="email", target="stuck@example.com", events=["stuck"])
    AlertDestination.objects.create(kind="email", target="off@example.com", enabled=False)
    AlertDestination.objects.create(kind="email", target="all@example.com")

    def targets(task_id: str, kind: str) -> list[str]:
        return sorted(t.target for t in alerts.destinations_for(task_id=task_id, kind=kind))

    assert targets("billing-invoice", "failed") == ["all@example.com", "billing@example.com"]
    assert targets("research", "failed") == ["all@example.com"]
    assert targets("research", "stuck") == ["all@example.com", "stuck@example.com"]


def test_a_task_names_its_own_destinations() -> None:
    t = task("t-alerting", alerts=["https://hooks.example.com/dex", "mailto:team@example.com"])(lambda ctx: None)
    try:
        assert t.alerts == ["https://hooks.example.com/dex", "team@example.com"]
        found = {(d.channel, d.target) for d in alerts.destinations_for(task_id="t-alerting", kind="timed_out")}
        assert found == {("webhook", "https://hooks.example.com/dex"), ("email", "team@example.com")}
    finally:
        registry.unregister("t-alerting")
    with pytest.raises(ValueError, match="neither an http"):
        task("t-bad-alerts", alerts=["ftp://nope"])(lambda ctx: None)
    with pytest.raises(ValueError, match="a list"):
        task("t-bad-alerts", alerts="ops@example.com")(lambda ctx: None)  # type: ignore[arg-type]


# --- delivering -------------------------------------------------------------------------------------------


def test_a_webhook_is_signed_and_a_500_is_retried_with_back_off(receiver: Receiver, settings) -> None:
    settings.DEX_ALERT_RETRY_INITIAL_SECONDS = 5
    receiver.statuses = [500]
    AlertDestination.objects.create(kind="webhook", target=receiver.url, secret=SECRET)
    run = _failed_run()
    delivery = alerts.alert_raise(run=run, kind=AlertKind.FAILED).deliveries.get()

    first = alerts.delivery_send(delivery.pk)
    assert not first.ok and first.retry_in == 5
    delivery.refresh_from_db()
    assert delivery.status == AlertDeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.history[0]["status"] == 500 and delivery.last_error == "HTTP 500 Internal Server Error"
    assert delivery.history[0]["response"] == "receiver is down"  # kept, never in the reason shown to all
    assert delivery.next_attempt_at > timezone.now()
    assert alerts.delivery_send(delivery.pk).not_due  # not before its back-off
    assert alerts.alerts_scan().resent == 0  # the back-off waits in Postgres, not in a countdown message
    assert receiver.count() == 1

    _due_now(delivery)
    connection.run_on_commit.clear()
    assert alerts.alerts_scan().resent == 1  # due: the scheduler's scan sends it again (after commit)
    connection.run_on_commit.clear()  # the broker is not part of this test
    assert alerts.delivery_send(delivery.pk).ok
    delivery.refresh_from_db()
    assert delivery.status == AlertDeliveryStatus.DELIVERED and delivery.attempts == 2
    assert [h["ok"] for h in delivery.history] == [False, True]
    assert alerts.delivery_send(delivery.pk).delivery.status == "delivered"  # a late duplicate message: no send
    assert receiver.count() == 2

    request = receiver.requests[-1]
    assert alerts.signature_verify(SECRET, request.headers["Dex-Signature"], request.body)
    assert not alerts.signature_verify("another-secret", request.headers["Dex-Signature"], request.body)
    assert not alerts.signature_verify(SECRET, request.headers["Dex-Signature"], request.body + b" ")
    body = json.loads(request.body)
    assert body["type"] == "run.failed" and body["run"]["id"] == str(run.pk)
    assert request.headers["Dex-Event"] == "run.failed" and request.headers["Dex-Delivery"] == str(delivery.pk)


def test_it_gives_up_after_the_max_attempts(settings) -> None:
    settings.DEX_ALERT_MAX_ATTEMPTS = 2
    settings.DEX_ALERT_TIMEOUT_SECONDS = 2
    with Receiver() as dead:
        url = dead.url  # a port nobody listens on once the receiver is closed
    AlertDestination.objects.create(kind="webhook", target=url, secret=SECRET)
    delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
    assert alerts.delivery_send(delivery.pk).retry_in is not None
    _due_now(delivery)
    assert alerts.delivery_send(delivery.pk).retry_in is None
    delivery.refresh_from_db()
    assert delivery.status == AlertDeliveryStatus.FAILED and delivery.next_attempt_at is None
    assert delivery.last_error == "Connection refused" and len(delivery.history) == 2


def test_a_redirect_is_a_failed_attempt_not_a_silent_get_elsewhere() -> None:
    with Receiver([302]) as moved:
        AlertDestination.objects.create(kind="webhook", target=moved.url, secret=SECRET)
        delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
        attempt = alerts.delivery_send(delivery.pk)
    assert not attempt.ok and attempt.delivery.response_status == 302
    assert moved.count() == 1  # nothing followed the Location


def test_signatures_expire() -> None:
    header = alerts.signature_header(SECRET, b"{}", timestamp=1_000_000)
    assert alerts.signature_verify(SECRET, header, b"{}", now=1_000_100)
    assert not alerts.signature_verify(SECRET, header, b"{}", now=1_000_000 + 3600)
    assert not alerts.signature_verify(SECRET, "v1=abc", b"{}")


def test_an_email_alert_says_what_failed_and_links_the_run(settings) -> None:
    settings.DEX_BASE_URL = "https://dex.example.com"
    AlertDestination.objects.create(kind="email", target="oncall@example.com")
    run = _failed_run(task_id="billing-invoice")
    delivery = alerts.alert_raise(run=run, kind=AlertKind.FAILED).deliveries.get()
    assert alerts.delivery_send(delivery.pk).ok

    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["oncall@example.com"]
    assert message.subject == "[Dex] billing-invoice run failed"
    assert "Error: ValueError: the step is broken" in message.body
    assert "Step: bad" in message.body
    assert f"https://dex.example.com/runs/{run.pk}/" in message.body


# --- the scheduler's scan -----------------------------------------------------------------------------------


def test_the_scan_raises_missed_alerts_stuck_waits_and_resends_lost_deliveries(settings) -> None:
    settings.DEX_ALERT_STUCK_SECONDS = 60
    AlertDestination.objects.create(kind="email", target="oncall@example.com")
    missed = _failed_run()  # failed without its settle hook (e.g. dead-lettered by the scheduler)
    waiting = Run.objects.create(task_id="t-approval", status=RunStatus.WAITING)
    wp = waitpoint_create(
        run_id=waiting.pk, step_key="approve", kind=WaitpointKind.APPROVAL, prompt="Ship it?", timeout_at=None
    )
    fresh = Run.objects.create(task_id="t-approval", status=RunStatus.WAITING)
    waitpoint_create(
        run_id=fresh.pk, step_key="approve", kind=WaitpointKind.APPROVAL, prompt="Ship it?", timeout_at=None
    )
    type(wp).objects.filter(pk=wp.pk).update(created_at=timezone.now() - timedelta(minutes=5))

    result = alerts.alerts_scan()
    assert (result.raised, result.stuck) == (1, 1)
    assert Alert.objects.get(run=missed).kind == AlertKind.FAILED
    stuck = Alert.objects.get(run=waiting)
    assert stuck.kind == AlertKind.STUCK and stuck.payload["waiting"] == "approval Ship it?"
    assert not Alert.objects.filter(run=fresh).exists()

    assert len(connection.run_on_commit) == 2  # each delivery is sent after commit
    connection.run_on_commit.clear()  # the broker is not part of this test

    # Nothing new the second time; a delivery whose message was lost long ago is re-sent (after commit).
    AlertDelivery.objects.update(next_attempt_at=timezone.now() - timedelta(hours=1))
    result = alerts.alerts_scan()
    assert (result.raised, result.stuck, result.resent) == (0, 0, 2)
    assert len(connection.run_on_commit) == 2
    connection.run_on_commit.clear()  # the broker is not part of this test
    assert alerts.alerts_scan().resent == 0


def test_an_idle_scan_is_three_queries(django_assert_num_queries) -> None:
    with django_assert_num_queries(3 + 2):  # + the savepoint pair of the re-send's atomic block
        alerts.alerts_scan()


# --- the Alerts page ---------------------------------------------------------------------------------------


def test_viewers_see_destinations_but_not_secrets_and_cannot_act(viewer: Client) -> None:
    dest = AlertDestination.objects.create(kind="webhook", target="https://hooks.example.com/x", secret=SECRET)
    page = viewer.get("/alerts/").content.decode()
    assert "https://hooks.example.com/x" in page and SECRET not in page
    assert "Send test alert" not in page
    assert viewer.post(f"/alerts/{dest.pk}/test/").status_code == 403
    assert viewer.post("/alerts/", {"kind": "email", "target": "x@example.com"}).status_code == 403
    assert viewer.post(f"/alerts/{dest.pk}/delete/").status_code == 403
    assert not Alert.objects.exists() and AlertDestination.objects.count() == 1


def test_an_operator_adds_tests_edits_and_deletes_a_webhook(operator: Client, receiver: Receiver) -> None:
    response = operator.post("/alerts/", {"kind": "webhook", "target": receiver.url, "enabled": "on"})
    assert response.status_code == 302
    dest = AlertDestination.objects.get()
    assert dest.secret.startswith("whsec_")  # generated: webhooks are always signed

    response = operator.post(f"/alerts/{dest.pk}/test/", follow=True)
    page = response.content.decode()
    assert f"Test alert delivered to {receiver.url} (HTTP 200)." in page
    request = receiver.requests[0]
    assert json.loads(request.body)["type"] == "run.test"
    assert alerts.signature_verify(dest.secret, request.headers["Dex-Signature"], request.body)
    assert 'class="status status-completed">Delivered' in page  # listed under recent deliveries

    response = operator.post(
        f"/alerts/{dest.pk}/",
        {"kind": "webhook", "target": receiver.url, "secret": dest.secret, "events": ["stuck"], "task_filter": "x-*"},
    )
    assert response.status_code == 302
    dest.refresh_from_db()
    assert dest.events == ["stuck"] and dest.task_filter == "x-*" and not dest.enabled

    assert operator.post(f"/alerts/{dest.pk}/delete/").status_code == 302
    assert not AlertDestination.objects.exists()
    assert AlertDelivery.objects.count() == 1  # the history stays
    actions = list(AuditEntry.objects.order_by("id").values_list("action", flat=True))
    assert actions == ["alert_destination_create", "alert_test", "alert_destination_update", "alert_destination_delete"]


def test_a_failing_test_alert_says_why(operator: Client, settings) -> None:
    settings.DEX_ALERT_TIMEOUT_SECONDS = 2
    with Receiver([503]) as down:
        dest = AlertDestination.objects.create(kind="webhook", target=down.url, secret=SECRET)
        page = operator.post(f"/alerts/{dest.pk}/test/", follow=True).content.decode()
    reason = "HTTP 503 Service Unavailable. The receiver answered: receiver is down"
    assert f"Test alert to {down.url} failed: {reason}" in page
    assert AlertDelivery.objects.get().status == AlertDeliveryStatus.FAILED  # a test is tried once


def test_a_test_email_lands_in_the_outbox(operator: Client) -> None:
    dest = AlertDestination.objects.create(kind="email", target="oncall@example.com")
    page = operator.post(f"/alerts/{dest.pk}/test/", follow=True).content.decode()
    assert "Test alert delivered to oncall@example.com" in page
    assert [m.subject for m in mail.outbox] == ["[Dex] Test alert"]


@pytest.mark.parametrize(
    "data, field, error",
    [
        ({"kind": "webhook", "target": "not a url"}, "target", "needs an http(s) URL"),
        ({"kind": "email", "target": "https://x.example.com"}, "target", "needs an email address"),
        ({"kind": "sms", "target": "+15551234"}, "kind", "Select a valid choice"),
        ({"kind": "email", "target": "a@example.com", "events": ["exploded"]}, "events", "Select a valid choice"),
    ],
)
def test_bad_destinations_are_form_errors(operator: Client, data: dict, field: str, error: str) -> None:
    response = operator.post("/alerts/", data)
    assert response.status_code == 422
    assert error in response.content.decode()
    assert not AlertDestination.objects.exists()


def test_settings_and_task_destinations_are_listed_read_only(viewer: Client, settings) -> None:
    settings.DEX_ALERT_EMAILS = ["oncall@example.com"]
    page = viewer.get("/alerts/").content.decode()
    assert "oncall@example.com" in page and "read-only: from DEX_ALERT_EMAILS" in page
    assert '<a href="/alerts/" aria-current="page">Alerts</a>' in page


# --- no reach inside (issue 12: SSRF through alert webhooks) ----------------------------------------------


def test_a_loopback_webhook_is_refused_without_a_connection_unless_allowed(settings, receiver: Receiver) -> None:
    settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS = []
    AlertDestination.objects.create(kind="webhook", target=receiver.url, secret=SECRET)
    delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
    assert not alerts.delivery_send(delivery.pk).ok
    delivery.refresh_from_db()
    assert delivery.last_error == "refused: 127.0.0.1 is not a public address"
    assert receiver.count() == 0  # not even a connection: no port-scan oracle

    settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS = ["127.0.0.0/8"]  # a network works as well as an address
    _due_now(delivery)
    assert alerts.delivery_send(delivery.pk).ok and receiver.count() == 1


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.7/hook", "http://[::1]:9/x", "http://0.0.0.0:9/"],
)
def test_metadata_and_private_addresses_are_refused(settings, target: str) -> None:
    settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS = []
    AlertDestination.objects.create(kind="webhook", target=target, secret=SECRET)
    delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
    attempt = alerts.delivery_send(delivery.pk)
    assert not attempt.ok and "is not a public address" in attempt.delivery.last_error


def test_a_redirect_to_a_host_that_is_not_allowed_is_refused(settings) -> None:
    settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS = ["localhost"]  # by name: its addresses aren't checked, others are
    with Receiver([307]) as moved:
        moved.location = f"http://127.0.0.1:{moved.server.server_address[1]}/inside"
        target = moved.url.replace("127.0.0.1", "localhost")
        AlertDestination.objects.create(kind="webhook", target=target, secret=SECRET)
        delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
        attempt = alerts.delivery_send(delivery.pk)
    assert not attempt.ok and attempt.delivery.last_error == "refused: 127.0.0.1 is not a public address"
    assert [r.path for r in moved.requests] == ["/hooks/dex"]  # the redirect was not followed


def test_viewers_see_status_timing_and_reason_but_never_the_reply(viewer: Client, receiver: Receiver) -> None:
    receiver.statuses = [500]
    receiver.reply = b"<script>alert(1)</script> internal: token=sk-live-abcdefghijklmnopqrstuvwxyz012345"
    AlertDestination.objects.create(kind="webhook", target=receiver.url, secret=SECRET)
    delivery = alerts.alert_raise(run=_failed_run(), kind=AlertKind.FAILED).deliveries.get()
    alerts.delivery_send(delivery.pk)
    page = viewer.get("/alerts/").content.decode()
    assert "HTTP 500 Internal Server Error" in page and "data-delivery-ms" in page
    assert "internal:" not in page and "<script>alert(1)" not in page
    delivery.refresh_from_db()
    assert "sk-live-abcdefghijklmnopqrstuvwxyz012345" not in delivery.history[0]["response"]  # redacted


def test_an_operator_testing_a_webhook_sees_the_reply_redacted_and_escaped(operator: Client) -> None:
    with Receiver([502]) as down:
        down.reply = b"<b>bad gateway</b> Authorization: Bearer abcdefghijklmnopqrstuvwxyz" + b"x" * 2000
        dest = AlertDestination.objects.create(kind="webhook", target=down.url, secret=SECRET)
        page = operator.post(f"/alerts/{dest.pk}/test/", follow=True).content.decode()
    assert "The receiver answered: &lt;b&gt;bad gateway&lt;/b&gt;" in page
    assert "abcdefghijklmnopqrstuvwxyz" not in page and "x" * 400 not in page
