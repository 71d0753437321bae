"""Alerts: tell people when a run failed, timed out or waits too long for an event or an approval.

How an alert travels:
1. When a worker settles a run as failed / timed out, the engine calls `alerts_run_settled` *after* the settle
   statement committed (never inside a step's statement): `alert_raise` inserts the Alert (one per run and
   kind: INSERT ... ON CONFLICT DO NOTHING) and one AlertDelivery per destination, and sends a
   `dex.deliver_alert` message per delivery on commit.
2. The Celery task claims the delivery with a conditional UPDATE (so two messages never send it twice at
   once), sends it (a signed webhook or an email) and records the attempt. A failed attempt sets the row's
   next_attempt_at (back-off, up to DEX_ALERT_MAX_ATTEMPTS): like a run's retry, the back-off is parked in
   Postgres, not held by a worker as a Celery countdown message.
3. The scheduler calls `alerts_scan` every DEX_ALERT_SCAN_SECONDS: it raises the alerts a lost settle hook or
   a dead-lettered run never raised, raises "stuck" alerts for runs waiting on an event or approval longer
   than DEX_ALERT_STUCK_SECONDS, and sends the deliveries that are due: retries whose back-off is over, and
   first attempts whose message was lost.

Destinations: the rows edited at /alerts/, the settings (DEX_ALERT_WEBHOOK_URL + DEX_ALERT_WEBHOOK_SECRET,
DEX_ALERT_EMAILS) and the task's own `@task(alerts=[url or email, ...])`.

Webhooks are signed like Stripe's: `Dex-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
`signature_verify` is the receiver's side.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.urls import reverse
from django.utils import timezone

from runs import safe_fetch
from runs.models import (
    Alert,
    AlertChannel,
    AlertDelivery,
    AlertDeliveryStatus,
    AlertDestination,
    AlertKind,
    Run,
    RunStatus,
)
from runs.ops.audit import Actor, audit_record
from runs.redact import redact
from runs.sdk import parse_alert_target
from runs.sdk.registry import UnknownTask, registry

log = logging.getLogger("dex.alerts")

RUN_ALERT_KINDS = (AlertKind.FAILED, AlertKind.TIMED_OUT, AlertKind.STUCK)
SIGNATURE_HEADER = "Dex-Signature"
# A receiver rejects signatures older than this (replays of a captured request).
SIGNATURE_TOLERANCE_SECONDS = 300
_MAX_RESPONSE_EXCERPT = 300


# --- destinations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    channel: str
    target: str
    destination_id: int | None = None


def target_parse(value: str) -> Target:
    """A task's `alerts=[...]` entry (see runs.sdk.parse_alert_target)."""
    channel, target = parse_alert_target(value)
    return Target(channel, target)


def destinations_for(*, task_id: str, kind: str) -> list[Target]:
    """Every destination an alert of `kind` about a run of `task_id` goes to, without duplicates."""
    found: list[Target] = []
    if kind == AlertKind.TEST:
        return found
    if settings.DEX_ALERT_WEBHOOK_URL:
        found.append(Target(AlertChannel.WEBHOOK, settings.DEX_ALERT_WEBHOOK_URL))
    found += [Target(AlertChannel.EMAIL, email) for email in settings.DEX_ALERT_EMAILS]
    task = _task_or_none(task_id)
    for value in getattr(task, "alerts", None) or ():
        found.append(target_parse(value))
    for dest in AlertDestination.objects.filter(enabled=True):
        if dest.events and kind not in dest.events:
            continue
        if dest.task_filter and not fnmatch.fnmatchcase(task_id, dest.task_filter):
            continue
        found.append(Target(dest.kind, dest.target, dest.pk))
    unique: dict[tuple[str, str], Target] = {}
    for t in found:
        unique.setdefault((t.channel, t.target), t)
    return list(unique.values())


def _task_or_none(task_id: str) -> Any:
    try:
        return registry.get(task_id)
    except UnknownTask:
        return None


def destination_secret_new() -> str:
    return "whsec_" + secrets.token_urlsafe(24)


def destination_save(*, destination: AlertDestination, by: Actor) -> AlertDestination:
    """Create or update a destination (a webhook gets its signing secret on first save); audited."""
    created = destination.pk is None
    if destination.kind == AlertChannel.WEBHOOK and not destination.secret:
        destination.secret = destination_secret_new()
    with transaction.atomic():
        destination.save()
        audit_record(
            by=by,
            action="alert_destination_create" if created else "alert_destination_update",
            destination=destination.pk,
            kind=destination.kind,
            target=destination.target,
        )
    return destination


def destination_delete(*, destination: AlertDestination, by: Actor) -> None:
    """Delete a destination (its past deliveries stay listed); audited."""
    with transaction.atomic():
        audit_record(
            by=by,
            action="alert_destination_delete",
            destination=destination.pk,
            kind=destination.kind,
            target=destination.target,
        )
        destination.delete()


# --- raising ------------------------------------------------------------------------------------------------


def run_url(run_id: Any) -> str:
    return settings.DEX_BASE_URL + reverse("run-detail", args=[run_id])


def _run_payload(run: Run, kind: str, detail: dict | None = None) -> dict:
    return {
        "type": f"run.{kind}",
        "run": {
            "id": str(run.id),
            "task": run.task_id,
            "status": run.status,
            "error": run.error,
            "created_at": run.created_at.isoformat() if run.created_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "url": run_url(run.id),
        },
        **(detail or {}),
    }


def alert_raise(*, run: Run, kind: str, detail: dict | None = None) -> Alert | None:
    """Raise the `kind` alert of `run` and queue its deliveries; None if this run already had one."""
    targets = destinations_for(task_id=run.task_id, kind=kind)
    with transaction.atomic():
        payload = _run_payload(run, kind, detail)
        with connection.cursor() as cur:
            cur.execute(
                """INSERT INTO runs_alert (run_id, kind, task_id, payload, created_at)
                   VALUES (%s, %s, %s, %s::jsonb, now())
                   ON CONFLICT (run_id, kind) DO NOTHING RETURNING id""",
                [str(run.id), kind, run.task_id, json.dumps(payload, default=str)],
            )
            row = cur.fetchone()
        if row is None:
            return None
        alert = Alert.objects.get(pk=row[0])
        alert.payload = {"id": str(alert.pk), "created_at": alert.created_at.isoformat(), **alert.payload}
        alert.save(update_fields=["payload"])
        deliveries = AlertDelivery.objects.bulk_create(
            AlertDelivery(
                alert=alert,
                destination_id=t.destination_id,
                channel=t.channel,
                target=t.target,
                next_attempt_at=timezone.now(),
            )
            for t in targets
        )
        for delivery in deliveries:
            delivery_enqueue_on_commit(delivery.pk)
    log.info("run %s: %s alert %s raised, %d deliveries", run.id, kind, alert.pk, len(deliveries))
    return alert


def alerts_run_settled(run_id: UUID | str, status: str) -> None:
    """The engine's hook, called after a run settled. Never raises: an alert must not break a worker (the
    scheduler's scan raises what this missed)."""
    if status not in (RunStatus.FAILED, RunStatus.TIMED_OUT):
        return
    try:
        run = Run.objects.get(pk=run_id)
        alert_raise(run=run, kind=status)
    except Exception:
        log.exception("run %s: raising its %s alert failed; the scheduler's alert scan will retry", run_id, status)


def delivery_enqueue_on_commit(delivery_id: int) -> None:
    transaction.on_commit(lambda: _enqueue(delivery_id))


# How a delivery reaches a worker: runs.tasks plugs in Celery when the app is ready.
_delivery_dispatcher: Callable[[int, str], None] | None = None


def set_delivery_dispatcher(dispatcher: Callable[[int, str], None]) -> None:
    global _delivery_dispatcher
    _delivery_dispatcher = dispatcher


def _enqueue(delivery_id: int) -> None:
    if _delivery_dispatcher is None:
        log.warning("alert delivery %s: no dispatcher is registered; the scan will send it", delivery_id)
        return
    try:
        _delivery_dispatcher(delivery_id, settings.DEX_DEFAULT_QUEUE)
    except Exception:  # the broker is down: the scheduler's scan re-sends due deliveries
        log.warning("alert delivery %s: could not reach the broker; the scan will re-send it", delivery_id)


# --- sending ------------------------------------------------------------------------------------------------


def signature_header(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def signature_verify(
    secret: str, header: str, body: bytes, *, tolerance: float = SIGNATURE_TOLERANCE_SECONDS, now: float | None = None
) -> bool:
    """A webhook receiver's check: the header's `v1` is the HMAC of "<t>.<body>" and `t` is recent."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


class DeliveryFailed(Exception):
    """A failed attempt: the message is a short reason (shown to everyone who may see /alerts/), never the
    receiver's reply; `response` is an excerpt of that reply, redacted, kept in the delivery's history."""

    def __init__(self, message: str, *, status: int | None = None, response: str = ""):
        super().__init__(message)
        self.status = status
        self.response = response


def _secret_for(delivery: AlertDelivery) -> str:
    if delivery.destination is not None and delivery.destination.secret:
        return delivery.destination.secret
    return settings.DEX_ALERT_WEBHOOK_SECRET


def _private_hosts() -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """DEX_ALERT_ALLOW_PRIVATE_HOSTS as (host names, networks): an operator's internal receivers."""
    names, networks = set(), []
    for entry in settings.DEX_ALERT_ALLOW_PRIVATE_HOSTS:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return names, networks


def _send_webhook(delivery: AlertDelivery) -> int:
    """POST the alert through runs.safe_fetch: a destination is typed by an operator, and the server must not
    become their way into what only it can reach (a cloud's metadata service, an admin port on loopback) —
    so public addresses only, redirects (307/308) checked again, unless DEX_ALERT_ALLOW_PRIVATE_HOSTS names
    the host or its network."""
    body = json.dumps(delivery.alert.payload, default=str).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Dex-Alerts/1",
        "Dex-Event": delivery.alert.payload.get("type", ""),
        # The same for every attempt: receivers deduplicate on it.
        "Dex-Delivery": str(delivery.pk),
    }
    secret = _secret_for(delivery)
    if secret:
        headers[SIGNATURE_HEADER] = signature_header(secret, body)
    names, networks = _private_hosts()

    def allowed(ip: safe_fetch.IPAddress) -> bool:
        return safe_fetch.is_public_address(ip) or any(ip in net for net in networks)

    try:
        page = safe_fetch.request(
            "POST",
            delivery.target,
            body=body,
            headers=headers,
            timeout=settings.DEX_ALERT_TIMEOUT_SECONDS,
            max_bytes=_MAX_RESPONSE_EXCERPT,
            allow=allowed,
            trusted_hosts=names,
        )
    except safe_fetch.FetchError as exc:
        # The reason only ("connection refused", "timed out", "refused: … is not a public address"): the URL
        # is shown beside it already.
        raise DeliveryFailed(exc.reason[:200]) from None
    if 200 <= page.status < 300:
        return page.status
    # The reply's body is the receiver's (or, were it a service it shouldn't reach, that service's): it goes
    # to the delivery's history, redacted and cut short, never into the reason everyone sees.
    raise DeliveryFailed(
        f"HTTP {page.status} {_phrase(page.status)}".strip(),
        status=page.status,
        response=redact(page.text.strip())[:_MAX_RESPONSE_EXCERPT],
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def delivery_response_excerpt(delivery: AlertDelivery) -> str:
    """The start of the receiver's reply to the last attempt (redacted), for the operator testing it."""
    last = delivery.history[-1] if delivery.history else {}
    return str(last.get("response") or "")


def _email_text(payload: dict) -> tuple[str, str]:
    run = payload.get("run") or {}
    kind = payload.get("type", "alert").removeprefix("run.")
    if kind == AlertKind.TEST:
        return "[Dex] Test alert", "This is a test alert from Dex: this destination receives Dex alerts.\n"
    what = {"failed": "failed", "timed_out": "timed out", "stuck": "has been waiting too long"}.get(kind, kind)
    subject = f"[Dex] {run.get('task')} run {what}"
    lines = [f"Run {run.get('id')} of task {run.get('task')} {what}.", ""]
    error = run.get("error") or {}
    if error:
        lines.append(f"Error: {error.get('type', '')}: {error.get('message', '')}")
        if error.get("step"):
            lines.append(f"Step: {error['step']}")
    if payload.get("waiting"):
        lines.append(f"Waiting for: {payload['waiting']}")
    lines += ["", f"Open it: {run.get('url')}"]
    return subject, "\n".join(lines) + "\n"


def _send_email(delivery: AlertDelivery) -> int:
    subject, text = _email_text(delivery.alert.payload)
    try:
        send_mail(subject, text, None, [delivery.target], fail_silently=False)
    except Exception as exc:  # smtplib and socket errors: recorded on the delivery, then retried
        raise DeliveryFailed(f"sending the email failed: {type(exc).__name__}: {exc}") from None
    return 250


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return min(settings.DEX_ALERT_RETRY_INITIAL_SECONDS * 4 ** (attempts - 1), 3600.0)


@dataclass(frozen=True)
class Attempt:
    """What `delivery_send` did: sent (ok), failed (retry_in = seconds until the next attempt, None if given
    up), or nothing (not_due = seconds until it is due; taken = someone else holds it or it is settled)."""

    delivery: AlertDelivery | None
    ok: bool = False
    retry_in: float | None = None
    not_due: float | None = None


def delivery_send(delivery_id: int, *, max_attempts: int | None = None) -> Attempt:
    """Make one attempt at a delivery if it is due, and record it."""
    max_attempts = max_attempts or settings.DEX_ALERT_MAX_ATTEMPTS
    # An attempt in flight holds the delivery until this passes (then a lost attempt may be taken again).
    hold = timedelta(seconds=settings.DEX_ALERT_TIMEOUT_SECONDS * 3 + 30)
    claimed = AlertDelivery.objects.filter(
        pk=delivery_id, status=AlertDeliveryStatus.PENDING, next_attempt_at__lte=Now()
    ).update(attempts=F("attempts") + 1, next_attempt_at=Now() + hold)
    if claimed != 1:
        delivery = AlertDelivery.objects.filter(pk=delivery_id).first()
        if delivery and delivery.status == AlertDeliveryStatus.PENDING and delivery.next_attempt_at:
            wait = (delivery.next_attempt_at - timezone.now()).total_seconds()
            if 0 < wait < settings.DEX_ALERT_RETRY_INITIAL_SECONDS * 4**max_attempts:
                return Attempt(delivery, not_due=wait)
        return Attempt(delivery)
    delivery = AlertDelivery.objects.select_related("alert", "destination").get(pk=delivery_id)
    started = time.monotonic()
    status: int | None = None
    error = response = ""
    try:
        send = _send_webhook if delivery.channel == AlertChannel.WEBHOOK else _send_email
        status = send(delivery)
        ok = True
    except DeliveryFailed as exc:
        ok, status, error, response = False, exc.status, str(exc), exc.response
    record = {
        "attempt": delivery.attempts,
        "at": timezone.now().isoformat(),
        "ok": ok,
        "status": status,
        "error": error,
        "ms": round((time.monotonic() - started) * 1000),
    }
    if response:
        record["response"] = response
    delivery.history = [*delivery.history, record]
    delivery.response_status = status
    delivery.last_error = error
    retry_in = None
    if ok:
        delivery.status = AlertDeliveryStatus.DELIVERED
        delivery.delivered_at = timezone.now()
        delivery.next_attempt_at = None
    elif delivery.attempts >= max_attempts:
        delivery.status = AlertDeliveryStatus.FAILED
        delivery.next_attempt_at = None
        log.warning("alert delivery %s to %s failed for good: %s", delivery.pk, delivery.target, error)
    else:
        retry_in = retry_delay(delivery.attempts)
        delivery.next_attempt_at = timezone.now() + timedelta(seconds=retry_in)
        log.info("alert delivery %s to %s failed (%s); retry in %.0fs", delivery.pk, delivery.target, error, retry_in)
    delivery.save(
        update_fields=["history", "response_status", "last_error", "status", "delivered_at", "next_attempt_at"]
    )
    return Attempt(delivery, ok=ok, retry_in=retry_in)


def alert_test_send(*, destination: AlertDestination, by: Actor) -> AlertDelivery:
    """Send a test alert to one destination now, once (no retries), and return the recorded delivery; audited
    with its outcome."""
    with transaction.atomic():
        alert = Alert.objects.create(kind=AlertKind.TEST, payload={})
        alert.payload = {
            "id": str(alert.pk),
            "created_at": alert.created_at.isoformat(),
            "type": "run.test",
            "message": "A test alert from Dex: this destination receives Dex alerts.",
            "run": None,
        }
        alert.save(update_fields=["payload"])
        delivery = AlertDelivery.objects.create(
            alert=alert,
            destination=destination,
            channel=destination.kind,
            target=destination.target,
            next_attempt_at=timezone.now() - timedelta(seconds=1),
        )
    sent = delivery_send(delivery.pk, max_attempts=1).delivery or delivery
    audit_record(
        by=by,
        action="alert_test",
        destination=destination.pk,
        target=destination.target,
        delivered=sent.status == AlertDeliveryStatus.DELIVERED,
        error=sent.last_error,
    )
    return sent


# --- the scheduler's backstop -------------------------------------------------------------------------------

_SCAN_SQL = """
SELECT 'settled', r.id, r.status, NULL::text FROM runs_run r
 WHERE r.status IN ('failed', 'timed_out') AND r.finished_at >= now() - make_interval(secs => %(lookback)s)
   AND NOT EXISTS (SELECT 1 FROM runs_alert a WHERE a.run_id = r.id AND a.kind = r.status)
 LIMIT %(batch)s
"""

_STUCK_SQL = """
SELECT DISTINCT ON (w.run_id) w.run_id, w.kind, coalesce(nullif(w.event_name, ''), w.prompt), w.created_at
  FROM runs_waitpoint w JOIN runs_run r ON r.id = w.run_id
 WHERE w.completed_at IS NULL
   AND w.created_at < now() - make_interval(secs => %(stuck)s)
   AND w.created_at >= now() - make_interval(secs => %(stuck)s + %(lookback)s)
   AND r.status = 'waiting'
   AND NOT EXISTS (SELECT 1 FROM runs_alert a WHERE a.run_id = w.run_id AND a.kind = 'stuck')
 ORDER BY w.run_id, w.created_at
 LIMIT %(batch)s
"""

_RESEND_SQL = """
WITH due AS (
  SELECT id FROM runs_alertdelivery
   WHERE status = 'pending'
     AND next_attempt_at < now() - CASE WHEN attempts = 0 THEN make_interval(secs => %(grace)s) ELSE '0s' END
   ORDER BY next_attempt_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
UPDATE runs_alertdelivery d SET next_attempt_at = now() FROM due WHERE d.id = due.id RETURNING d.id
"""


@dataclass
class ScanResult:
    raised: int = 0
    stuck: int = 0
    resent: int = 0


def alerts_scan(*, batch: int = 200) -> ScanResult:
    """The scheduler's backstop (module docstring, step 3). Three indexed queries when there is nothing to do:
    run_failed_finished_idx, waitpoint_open_idx and alertdelivery_due_idx."""
    result = ScanResult()
    params = {"lookback": settings.DEX_ALERT_LOOKBACK_SECONDS, "batch": batch}
    with connection.cursor() as cur:
        cur.execute(_SCAN_SQL, params)
        settled = cur.fetchall()
        stuck = []
        if settings.DEX_ALERT_STUCK_SECONDS > 0:  # 0 turns "stuck" alerts off
            cur.execute(_STUCK_SQL, {**params, "stuck": settings.DEX_ALERT_STUCK_SECONDS})
            stuck = cur.fetchall()
    runs = Run.objects.in_bulk([row[1] for row in settled] + [row[0] for row in stuck])
    for _, run_id, status, _ in settled:
        if run_id in runs and alert_raise(run=runs[run_id], kind=status) is not None:
            result.raised += 1
    for run_id, kind, what, since in stuck:
        detail = {"waiting": f"{kind} {what}".strip(), "waiting_since": since.isoformat()}
        if run_id in runs and alert_raise(run=runs[run_id], kind=AlertKind.STUCK, detail=detail) is not None:
            result.stuck += 1
    # A retry is sent as soon as its back-off is over (an attempt in flight holds next_attempt_at ahead); a first
    # attempt's message older than this was lost (the broker restarted, a worker died mid-send).
    grace = max(30.0, settings.DEX_ALERT_TIMEOUT_SECONDS * 3)
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(_RESEND_SQL, {"grace": grace, "batch": batch})
        resent = [row[0] for row in cur.fetchall()]
        for delivery_id in resent:
            delivery_enqueue_on_commit(delivery_id)
    result.resent = len(resent)
    return result
