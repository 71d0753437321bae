"""The dashboard's other pages (DESIGN.md §6): tasks (stats and trigger form), events, approvals, schedules,
API keys.

Viewers read; every POST is an operator's (`operator_required`: 403 for a viewer, the login page for an
anonymous visitor), goes through a service, and records an audit entry. Every form works without JS (POST,
then a redirect, or the page again with its errors); htmx only swaps the region a form lives in. Bad input
is a form error on the field it concerns, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydantic
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from runs import selectors, services
from runs.models import ApiKey, Event, Run, Schedule, ScheduleSource, Waitpoint, WaitpointKind
from runs.ops.audit import Actor, is_operator
from runs.ops.schedules import ScheduleInvalid, ScheduleOwnedByCode, schedule_create, schedule_delete, schedule_update
from runs.sdk import Task
from runs.sdk.registry import UnknownTask, registry
from runs.services import WaitpointError, event_send, waitpoint_complete
from runs.web import forms as dex_forms
from runs.web.permissions import operator_required

RECENT_EVENTS = 50
PENDING_APPROVALS = 100
TASK_RECENT_RUNS = 10
STATS_WINDOW = timedelta(hours=24)


def _go(request: HttpRequest, url_name: str, *args: Any) -> HttpResponse:
    """After a successful POST: a redirect, or for htmx a client-side one (htmx would follow a 302 itself and
    swap the whole next page into the form's region)."""
    url = reverse(url_name, args=args)
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


# --- tasks -------------------------------------------------------------------------------------------------


TaskStats = selectors.TaskStats


def task_stats_last_24h(task_ids: list[str]) -> dict[str, TaskStats]:
    """Runs, failure rate, p50 duration, LLM cost and tokens per task over the last 24 hours (bounded queries)."""
    return selectors.task_stats(task_ids, window=STATS_WINDOW)


@dataclass(frozen=True)
class TaskView:
    """What a template shows of a task (a Task itself is callable, and templates call callables)."""

    id: str
    description: str
    qualified_name: str

    @classmethod
    def of(cls, task: Task) -> TaskView:
        return cls(id=task.id, description=task.description, qualified_name=task.qualified_name)


def _task_or_404(task_id: str) -> Task:
    try:
        return registry.get(task_id)
    except UnknownTask:
        raise Http404("no such task") from None


def _task_options(task: Task) -> list[tuple[str, str]]:
    # A task without its own queue goes to the default one, which the workers consume by its name.
    options = [("queue", task.queue or settings.DEX_DEFAULT_QUEUE), ("retry", f"{task.retry.attempts} attempts")]
    if task.concurrency:
        options.append(
            ("concurrency", f"{task.concurrency}" + (f" per {task.concurrency_key}" if task.concurrency_key else ""))
        )
    if task.rate_limit:
        options.append(("rate limit", f"{task.rate_limit[0]} per {task.rate_limit[1]:g} s"))
    if task.max_duration:
        options.append(("max duration", f"{task.max_duration:g} s"))
    if task.schedule:
        options.append(("schedule", task.schedule))
    if task.events:
        options.append(("events", ", ".join(task.events)))
    if task.budget_usd is not None:
        options.append(("budget", f"${task.budget_usd:g}"))
    return options


@require_GET
@login_required
def task_list(request: HttpRequest) -> HttpResponse:
    tasks = registry.all()
    stats = task_stats_last_24h([t.id for t in tasks])
    rows = [{"task": TaskView.of(t), "stats": stats.get(t.id, TaskStats()), "options": _task_options(t)} for t in tasks]
    return render(request, "runs/tasks.html", {"rows": rows})


@require_http_methods(["GET", "POST"])
@login_required
def task_detail(request: HttpRequest, task_id: str) -> HttpResponse:
    task = _task_or_404(task_id)
    if request.method == "POST":
        return _task_trigger(request, task)
    return _task_page(request, task, _payload_form(task), dex_forms.TriggerOptionsForm())


def _payload_form(task: Task, data: Any = None) -> dex_forms.PayloadForm | None:
    """The trigger form, or None when the task's type hints can't make one (the page still renders and says
    so; the API still triggers the task)."""
    try:
        return dex_forms.PayloadForm(data, model=task.payload_model)
    except Exception:  # any hint pydantic or our mapping can't handle: a page must not 500 on agent code
        return None


@operator_required
def _task_trigger(request: HttpRequest, task: Task) -> HttpResponse:
    payload_form = _payload_form(task, request.POST)
    options_form = dex_forms.TriggerOptionsForm(request.POST)
    if payload_form is not None and payload_form.is_valid() and options_form.is_valid():
        options = options_form.cleaned_data
        try:
            run, created = services.run_trigger(
                task_id=task.id,
                payload=payload_form.payload(),
                idempotency_key=options["idempotency_key"] or None,
                tags=options["tags"],
                delay=options["delay"],
                by=Actor.web(request.user),
            )
        except pydantic.ValidationError as exc:
            dex_forms.payload_errors_to_form(payload_form, exc)
        else:
            if created:
                messages.success(request, f"Triggered {task.id}: run {run.pk}.")
            else:
                messages.info(request, "A run with this idempotency key already exists: here it is.")
            return _go(request, "run-detail", run.pk)
    return _task_page(request, task, payload_form, options_form, status=200 if request.htmx else 422)


def _task_page(
    request: HttpRequest,
    task: Task,
    payload_form: dex_forms.PayloadForm | None,
    options_form: dex_forms.TriggerOptionsForm,
    *,
    status: int = 200,
) -> HttpResponse:
    context = {
        "task": TaskView.of(task),
        "stats": task_stats_last_24h([task.id]).get(task.id, TaskStats()),
        "options": _task_options(task),
        "payload_form": payload_form,
        "options_form": options_form,
        "recent_runs": Run.objects.filter(task_id=task.id).order_by("-id")[:TASK_RECENT_RUNS],
        "can_operate": is_operator(request.user),
    }
    template = (
        "runs/task_detail.html#trigger-form" if request.htmx and request.method == "POST" else "runs/task_detail.html"
    )
    return render(request, template, context, status=status)


# --- events ------------------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
def event_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _event_send(request)
    return _events_page(request, dex_forms.EventSendForm())


@operator_required
def _event_send(request: HttpRequest) -> HttpResponse:
    form = dex_forms.EventSendForm(request.POST)
    if not form.is_valid():
        return _events_page(request, form, status=200 if request.htmx else 422)
    event, created = event_send(
        name=form.cleaned_data["name"],
        data=form.cleaned_data["data"],
        external_id=form.cleaned_data["id"],
        by=Actor.web(request.user),
    )
    outcome = event.outcome or {}
    if created:
        resumed, started = len(outcome.get("resumed", [])), len(outcome.get("started", []))
        messages.success(request, f"Sent {event.name}: resumed {resumed} run(s), started {started}.")
    else:
        messages.info(request, f"An event with id {event.external_id} was already received; nothing was sent.")
    return _go(request, "event-list")


def _events_page(request: HttpRequest, form: dex_forms.EventSendForm, *, status: int = 200) -> HttpResponse:
    context = {
        "events": Event.objects.order_by("-id")[:RECENT_EVENTS],
        "form": form,
        "can_operate": is_operator(request.user),
    }
    template = "runs/events.html#send-form" if request.htmx and request.method == "POST" else "runs/events.html"
    return render(request, template, context, status=status)


# --- approvals ---------------------------------------------------------------------------------------------


def _approval_form(wp: Waitpoint, data: Any = None) -> Any:
    """The waitpoint's Django form (prefixed, so several on a page don't clash), or None."""
    if not wp.form:
        return None
    try:
        form_class = import_string(wp.form)
    except ImportError:
        return None
    return form_class(data, prefix=f"wp{wp.pk}")


@require_GET
@login_required
def approval_list(request: HttpRequest) -> HttpResponse:
    pending = list(
        Waitpoint.objects.filter(kind=WaitpointKind.APPROVAL, completed_at__isnull=True)
        .select_related("run")
        .order_by("created_at")[:PENDING_APPROVALS]
    )
    approvals = [
        {"wp": wp, "form": _approval_form(wp), "form_missing": bool(wp.form) and _approval_form(wp) is None}
        for wp in pending
    ]
    return render(request, "runs/approvals.html", {"approvals": approvals, "can_operate": is_operator(request.user)})


@require_POST
@operator_required
def approval_complete(request: HttpRequest, waitpoint_id: int) -> HttpResponse:
    wp = get_object_or_404(Waitpoint.objects.select_related("run"), pk=waitpoint_id, kind=WaitpointKind.APPROVAL)
    decision = request.POST.get("decision")
    comment = request.POST.get("comment", "")[:2000]
    form = _approval_form(wp, request.POST if decision == "approve" else None)
    error = ""
    if decision not in ("approve", "reject"):
        error = "Choose Approve or Reject."
    else:
        fields: dict[str, Any] = {}
        if form is not None and decision == "approve":
            # The raw values, by the form's own widgets: waitpoint_complete validates them with the same form.
            fields = {
                name: field.widget.value_from_datadict(request.POST, request.FILES, form.add_prefix(name))
                for name, field in form.fields.items()
            }
        data = {"approved": decision == "approve", "comment": comment, "data": fields}
        try:
            waitpoint_complete(token=wp.token, data=data, by=Actor.web(request.user))
        except ImportError:  # the form's code moved since the run asked: approving would lose its checks
            messages.error(request, f"The approval's form {wp.form} can't be imported: reject it, or fix the code.")
            return _go(request, "approval-list")
        except WaitpointError as exc:
            if exc.status != 422:  # already completed (409) or gone: nothing left to answer here
                messages.error(request, str(exc))
                return _go(request, "approval-list")
            error = str(exc)
            if form is not None:
                form.is_valid()  # the same errors, shown on their fields
        else:
            notice = f"{'Approved' if decision == 'approve' else 'Rejected'}: run {wp.run_id} resumes."
            if request.htmx:
                return render(request, "runs/approvals.html#approval-done", {"wp": wp, "notice": notice})
            messages.success(request, notice)
            return redirect("approval-list")
    item = {"wp": wp, "form": form, "error": error, "comment": comment}
    if request.htmx:
        return render(request, "runs/approvals.html#approval", {"item": item, "can_operate": True})
    return render(
        request, "runs/approvals.html", {"approvals": [item], "can_operate": True, "only_one": True}, status=422
    )


# --- schedules ---------------------------------------------------------------------------------------------


def _schedule_errors(form: dex_forms.ScheduleForm, exc: ScheduleInvalid) -> None:
    for field, errors in exc.message_dict.items():
        for error in errors:
            form.add_error(field if field in form.fields else None, error)


@require_http_methods(["GET", "POST"])
@login_required
def schedule_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _schedule_create(request)
    return _schedules_page(request, dex_forms.ScheduleForm())


@operator_required
def _schedule_create(request: HttpRequest) -> HttpResponse:
    form = dex_forms.ScheduleForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            schedule = schedule_create(
                task_id=data["task_id"],
                cron=data["cron"],
                timezone=data["timezone"],
                payload=data["payload"],
                enabled=data["enabled"],
                by=Actor.web(request.user),
            )
        except ScheduleInvalid as exc:
            _schedule_errors(form, exc)
        else:
            messages.success(request, f"Scheduled {schedule.task_id} at {schedule.cron} ({schedule.timezone}).")
            return redirect("schedule-list")
    return _schedules_page(request, form, status=422)


def _schedules_page(request: HttpRequest, form: dex_forms.ScheduleForm, *, status: int = 200) -> HttpResponse:
    context = {
        "schedules": Schedule.objects.select_related("last_run").order_by("task_id", "id"),
        "form": form,
        "can_operate": is_operator(request.user),
        "has_tasks": bool(registry.all()),
    }
    return render(request, "runs/schedules.html", context, status=status)


@require_http_methods(["GET", "POST"])
@login_required
def schedule_edit(request: HttpRequest, schedule_id: int) -> HttpResponse:
    schedule = get_object_or_404(Schedule, pk=schedule_id)
    if schedule.source == ScheduleSource.CODE:
        messages.error(request, f"The schedule of {schedule.task_id} is declared in code: change @task(schedule=...).")
        return redirect("schedule-list")
    if request.method == "POST":
        return _schedule_update(request, schedule)
    form = dex_forms.ScheduleForm(schedule=schedule)
    return render(
        request, "runs/schedules.html", {"editing": schedule, "form": form, "can_operate": is_operator(request.user)}
    )


@operator_required
def _schedule_update(request: HttpRequest, schedule: Schedule) -> HttpResponse:
    form = dex_forms.ScheduleForm(request.POST, schedule=schedule)
    if form.is_valid():
        data = form.cleaned_data
        try:
            schedule_update(
                schedule=schedule,
                cron=data["cron"],
                timezone=data["timezone"],
                payload=data["payload"],
                enabled=data["enabled"],
                by=Actor.web(request.user),
            )
        except ScheduleInvalid as exc:
            _schedule_errors(form, exc)
        except ScheduleOwnedByCode as exc:
            messages.error(request, str(exc))
            return redirect("schedule-list")
        else:
            messages.success(request, f"Updated the schedule of {schedule.task_id}.")
            return redirect("schedule-list")
    context = {"editing": schedule, "form": form, "can_operate": True}
    return render(request, "runs/schedules.html", context, status=422)


@require_POST
@operator_required
def schedule_remove(request: HttpRequest, schedule_id: int) -> HttpResponse:
    schedule = get_object_or_404(Schedule, pk=schedule_id)
    try:
        schedule_delete(schedule=schedule, by=Actor.web(request.user))
    except ScheduleOwnedByCode as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Deleted the schedule of {schedule.task_id} ({schedule.cron}).")
    return redirect("schedule-list")


# --- API keys ----------------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
def apikey_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _apikey_create(request)
    return _apikeys_page(request, dex_forms.ApiKeyCreateForm())


@operator_required
def _apikey_create(request: HttpRequest) -> HttpResponse:
    form = dex_forms.ApiKeyCreateForm(request.POST)
    if not form.is_valid():
        return _apikeys_page(request, form, status=422)
    days = form.cleaned_data.get("expires_in_days")
    key, secret = services.apikey_create(
        name=form.cleaned_data["name"],
        by=Actor.web(request.user),
        scopes=form.cleaned_data["scopes"],
        expires_in=timedelta(days=days) if days else None,
    )
    # Rendered, not redirected: the secret must not pass through the session or a cookie (messages), and
    # this response is the only place it ever appears.
    response = _apikeys_page(request, dex_forms.ApiKeyCreateForm(), new_key=key, secret=secret)
    response["Cache-Control"] = "no-store"
    return response


def _apikeys_page(
    request: HttpRequest, form: dex_forms.ApiKeyCreateForm, *, status: int = 200, **extra: Any
) -> HttpResponse:
    context = {
        "keys": ApiKey.objects.select_related("created_by").order_by("revoked_at", "-created_at"),
        "form": form,
        "can_operate": is_operator(request.user),
        "now": timezone.now(),
        **extra,
    }
    return render(request, "runs/api_keys.html", context, status=status)


@require_POST
@operator_required
def apikey_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=key_id)
    if services.apikey_revoke(key=key, by=Actor.web(request.user)):
        messages.success(request, f"Revoked {key.name} ({key.prefix}…): requests with it now fail.")
    else:
        messages.info(request, f"{key.name} was already revoked.")
    return redirect("apikey-list")


@require_GET
@login_required
def usage(request: HttpRequest) -> HttpResponse:
    """LLM spend: cost and tokens by task and day, and what memoisation and the response cache saved."""
    days = 30
    rows = selectors.llm_usage_by_task_and_day(days=days)
    by_task: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_task.setdefault(row.task_id, {"task_id": row.task_id, "calls": 0, "tokens": 0, "cost_usd": 0})
        entry["calls"] += row.calls
        entry["tokens"] += row.input_tokens + row.output_tokens
        entry["cost_usd"] += row.cost_usd
    context = {
        "days": days,
        "rows": rows,
        "tasks": sorted(by_task.values(), key=lambda e: -e["cost_usd"]),
        "totals": selectors.llm_spend_totals(days=days),
    }
    return render(request, "runs/usage.html", context)
