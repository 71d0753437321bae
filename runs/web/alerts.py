"""The Alerts page (/alerts/): where alerts go, what was delivered, and a "Send test alert" button.

Viewers read (secrets hidden); operators create, edit, delete and test destinations, each recorded in the
audit log. Destinations from settings and from `@task(alerts=...)` are listed read-only: code and
environment own them.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.validators import EmailValidator, URLValidator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from runs.models import AlertChannel, AlertDelivery, AlertDeliveryStatus, AlertDestination, AlertKind
from runs.ops import alerts
from runs.ops.audit import Actor, is_operator
from runs.sdk.registry import registry
from runs.web.permissions import operator_required

RECENT_DELIVERIES = 50
_RUN_KINDS = [(k.value, k.label) for k in alerts.RUN_ALERT_KINDS]


class AlertDestinationForm(forms.ModelForm):
    events = forms.MultipleChoiceField(
        choices=_RUN_KINDS,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked = all of them.",
    )

    class Meta:
        model = AlertDestination
        fields = ["kind", "target", "secret", "events", "task_filter", "enabled"]
        labels = {"target": "URL or email address", "task_filter": "Tasks"}
        help_texts = {
            "secret": "Signs webhook bodies (Dex-Signature header). Left blank, one is generated.",
            "task_filter": "A task id or a glob such as billing-*; blank = every task.",
        }
        widgets = {"secret": forms.TextInput(attrs={"autocomplete": "off"})}

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        kind, target = data.get("kind"), (data.get("target") or "").strip()
        if kind and target:
            try:
                if kind == AlertChannel.WEBHOOK:
                    URLValidator(schemes=["http", "https"])(target)
                else:
                    EmailValidator()(target)
            except forms.ValidationError:
                what = "an http(s) URL" if kind == AlertChannel.WEBHOOK else "an email address"
                self.add_error("target", f"A {kind} destination needs {what}.")
            data["target"] = target
        if kind == AlertChannel.EMAIL:
            data["secret"] = ""
        return data


def _configured_elsewhere() -> list[dict[str, str]]:
    """Destinations from settings and task code, shown read-only."""
    rows = []
    if settings.DEX_ALERT_WEBHOOK_URL:
        rows.append({"kind": "webhook", "target": settings.DEX_ALERT_WEBHOOK_URL, "source": "DEX_ALERT_WEBHOOK_URL"})
    rows += [{"kind": "email", "target": e, "source": "DEX_ALERT_EMAILS"} for e in settings.DEX_ALERT_EMAILS]
    for task in registry.all():
        for value in getattr(task, "alerts", None) or ():
            target = alerts.target_parse(value)
            rows.append({"kind": target.channel, "target": target.target, "source": f"@task({task.id!r}, alerts=...)"})
    return rows


def _page(
    request: HttpRequest, form: AlertDestinationForm, *, editing: AlertDestination | None = None, status: int = 200
) -> HttpResponse:
    context = {
        "destinations": AlertDestination.objects.order_by("id"),
        "elsewhere": _configured_elsewhere(),
        "deliveries": AlertDelivery.objects.select_related("alert", "destination").order_by("-id")[:RECENT_DELIVERIES],
        "form": form,
        "editing": editing,
        "can_operate": is_operator(request.user),
        "kinds": AlertKind,
        "statuses": AlertDeliveryStatus,
        "stuck_after": settings.DEX_ALERT_STUCK_SECONDS,
    }
    return render(request, "runs/alerts.html", context, status=status)


@require_http_methods(["GET", "POST"])
@login_required
def alert_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _alert_create(request)
    return _page(request, AlertDestinationForm(initial={"kind": AlertChannel.WEBHOOK, "enabled": True}))


def _save(request: HttpRequest, form: AlertDestinationForm) -> AlertDestination:
    return alerts.destination_save(destination=form.save(commit=False), by=Actor.web(request.user))


@operator_required
def _alert_create(request: HttpRequest) -> HttpResponse:
    form = AlertDestinationForm(request.POST)
    if not form.is_valid():
        return _page(request, form, status=422)
    dest = _save(request, form)
    messages.success(request, f"Alerts now go to {dest.target} too. Send a test alert to check it.")
    return redirect("alert-list")


@require_http_methods(["GET", "POST"])
@login_required
def alert_edit(request: HttpRequest, destination_id: int) -> HttpResponse:
    dest = get_object_or_404(AlertDestination, pk=destination_id)
    if request.method == "POST":
        return _alert_update(request, dest)
    return _page(request, AlertDestinationForm(instance=dest), editing=dest)


@operator_required
def _alert_update(request: HttpRequest, dest: AlertDestination) -> HttpResponse:
    form = AlertDestinationForm(request.POST, instance=dest)
    if not form.is_valid():
        return _page(request, form, editing=dest, status=422)
    dest = _save(request, form)
    messages.success(request, f"Saved the destination {dest.target}.")
    return redirect("alert-list")


@require_POST
@operator_required
def alert_delete(request: HttpRequest, destination_id: int) -> HttpResponse:
    dest = get_object_or_404(AlertDestination, pk=destination_id)
    alerts.destination_delete(destination=dest, by=Actor.web(request.user))
    messages.success(request, f"Deleted the destination {dest.target}; its past deliveries stay listed.")
    return redirect("alert-list")


@require_POST
@operator_required
def alert_test(request: HttpRequest, destination_id: int) -> HttpResponse:
    """Send a test alert now (one attempt, in this request, bounded by DEX_ALERT_TIMEOUT_SECONDS) and say how
    it went."""
    dest = get_object_or_404(AlertDestination, pk=destination_id)
    delivery = alerts.alert_test_send(destination=dest, by=Actor.web(request.user))
    if delivery.status == AlertDeliveryStatus.DELIVERED:
        how = f"HTTP {delivery.response_status}" if dest.kind == AlertChannel.WEBHOOK else "handed to the mail server"
        messages.success(request, f"Test alert delivered to {dest.target} ({how}).")
    else:
        # Only the operator who pressed the button sees the reply's start (redacted, 300 characters, escaped
        # by the template); the delivery list shows everyone the short reason alone.
        excerpt = alerts.delivery_response_excerpt(delivery)
        answered = f" The receiver answered: {excerpt}" if excerpt else ""
        messages.error(request, f"Test alert to {dest.target} failed: {delivery.last_error}.{answered}")
    return redirect("alert-list")
