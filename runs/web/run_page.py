"""The run page (DESIGN.md §6): the page itself, its operator actions and its JSON downloads.

Viewers read; operators act (`runs.ops.audit.is_operator`): an action's POST from anyone else is a 403, whatever
the page showed. Every action goes through runs.services, records an audit entry, and answers:
- an htmx request with the page's regions re-rendered (the same partials the websocket consumer pushes,
  with `hx-swap-oob`) plus a notice, or an `HX-Redirect` to the new run of a replay or fork;
- a plain form POST (no JS) with a redirect, the outcome in a message.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pydantic
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.module_loading import import_string
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from runs import services
from runs.engine import StepOutputError
from runs.models import Run, Step, Waitpoint, WaitpointKind
from runs.ops.audit import Actor, is_operator
from runs.sdk.registry import UnknownTask
from runs.services import WaitpointError, waitpoint_complete
from runs.web import fragments
from runs.web.permissions import operator_required

# --- the page -----------------------------------------------------------------------------------------------


@require_GET
@login_required
def run_detail(request: HttpRequest, run_id: UUID) -> HttpResponse:
    step_key = request.GET.get("step") or None
    context = fragments.run_detail_context(run_id, can_operate=is_operator(request.user), step_key=step_key)
    if context is None:
        raise Http404("no such run")
    return render(request, fragments.RUN_DETAIL_TEMPLATE, context)


@require_GET
@login_required
def run_step(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The step inspector for `?step=<key>`: the region alone for htmx, else the whole run page with it open
    (what a row's own link, `/runs/<id>/?step=<key>`, shows too)."""
    if not request.htmx:
        return run_detail(request, run_id)
    run = fragments.run_get_or_none(run_id)
    if run is None:
        raise Http404("no such run")
    key = request.GET.get("step") or ""
    inspector = fragments.step_inspector_context(run, key, can_operate=is_operator(request.user)) if key else None
    return HttpResponse(fragments.render_step_inspector(run, inspector, request=request))


@require_GET
@login_required
def run_trace(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """A (child) run's steps on its own time axis: what a child nested in its parent's trace expands to."""
    run = fragments.run_get_or_none(run_id)
    if run is None:
        raise Http404("no such run")
    steps = list(Step.objects.filter(run_id=run.pk).order_by("seq")[: fragments.STEPS_LIMIT])
    return HttpResponse(fragments.render_child_trace(run, steps))


# --- actions ------------------------------------------------------------------------------------------------


@require_POST
@operator_required
def run_cancel(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    try:
        run = services.run_cancel(run=run, by=Actor.web(request.user))
    except services.RunStateError as exc:
        return _refused(request, run_id, str(exc))
    done = "Canceled." if run.is_terminal else "Cancel requested: the run stops at its next step boundary."
    return _done(request, run_id, done)


@require_POST
@operator_required
def run_retry(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    try:
        services.run_retry(run=run, by=Actor.web(request.user))
    except services.RunStateError as exc:
        return _refused(request, run_id, str(exc))
    return _done(request, run_id, "Retrying from the failed step.")


@require_POST
@operator_required
def run_replay(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    payload = None
    text = request.POST.get("payload", "").strip()
    if text:
        try:
            payload = json.loads(text)
        except ValueError as exc:
            return _refused(request, run_id, f"The payload isn't valid JSON: {exc}")
        if not isinstance(payload, dict):
            return _refused(request, run_id, "The payload must be a JSON object.")
        if payload == run.payload:
            payload = None  # the form echoes the payload back: unchanged is not an edit
    try:
        new = services.run_replay(run=run, payload=payload, by=Actor.web(request.user))
    except (services.RunStateError, UnknownTask) as exc:
        return _refused(request, run_id, str(exc))
    except pydantic.ValidationError as exc:
        return _refused(request, run_id, f"The payload doesn't fit the task: {_errors(exc)}")
    return _go_to(request, new, f"Replayed as run {new.pk}.")


@require_POST
@operator_required
def run_fork(request: HttpRequest, run_id: UUID, step_pk: int) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    step = get_object_or_404(Step, pk=step_pk, run_id=run.pk)
    edit: dict[str, Any] = {}
    text = request.POST.get("output", "").strip()
    if text:
        try:
            edit["output"] = json.loads(text)
        except ValueError as exc:
            return _refused(request, run_id, f"The edited output isn't valid JSON: {exc}")
    try:
        fork = services.run_fork(run=run, step_key=step.key, by=Actor.web(request.user), **edit)
    except (services.RunStateError, StepOutputError) as exc:
        return _refused(request, run_id, str(exc))
    return _go_to(request, fork, f"Forked from step {step.key} as run {fork.pk}.")


@require_POST
@operator_required
def run_waitpoint_complete(request: HttpRequest, run_id: UUID, waitpoint_id: int) -> HttpResponse:
    """Approve or reject a pending approval, with its form's fields (validated by waits, on approval)."""
    wp = get_object_or_404(Waitpoint, pk=waitpoint_id, run_id=run_id, kind=WaitpointKind.APPROVAL)
    decision = request.POST.get("decision")
    if decision not in ("approve", "reject"):
        return _refused(request, run_id, "Choose Approve or Reject.")
    data = {
        "approved": decision == "approve",
        "comment": request.POST.get("comment", "")[:2000],
        "data": _approval_fields(request, wp) if decision == "approve" else {},
    }
    try:
        waitpoint_complete(token=wp.token, data=data, by=Actor.web(request.user))
    except WaitpointError as exc:
        details = "; ".join(f"{d['loc'][-1]}: {d['msg']}" for d in exc.details or [] if d.get("loc"))
        return _refused(request, run_id, f"{exc}{': ' + details if details else ''}.")
    return _done(request, run_id, "Approved." if data["approved"] else "Rejected.")


def _approval_fields(request: HttpRequest, wp: Waitpoint) -> dict[str, Any]:
    """The form's fields as posted (named with the waitpoint's prefix on the page), read by their widgets."""
    if not wp.form:
        return {}
    try:
        form = import_string(wp.form)(prefix=fragments.approval_form_prefix(wp.pk))
    except ImportError:
        return {}
    return {
        name: field.widget.value_from_datadict(request.POST, request.FILES, form.add_prefix(name))
        for name, field in form.fields.items()
    }


def _done(request: HttpRequest, run_id: UUID, notice: str) -> HttpResponse:
    if not request.htmx:
        messages.success(request, notice)
        return redirect("run-detail", run_id)
    return _regions(request, run_id, notice=notice, level="success")


def _refused(request: HttpRequest, run_id: UUID, notice: str) -> HttpResponse:
    if not request.htmx:
        messages.error(request, notice)
        return redirect("run-detail", run_id)
    # 200, not 409: htmx swaps no 4xx response, and the notice is what the operator needs to see.
    return _regions(request, run_id, notice=notice, level="error")


def _regions(request: HttpRequest, run_id: UUID, *, notice: str, level: str) -> HttpResponse:
    run = fragments.run_detail_get_or_none(run_id)
    if run is None:
        raise Http404("no such run")
    html = fragments.render_run_status(run, can_operate=True, request=request)
    html += render_to_string(
        f"{fragments.RUN_DETAIL_TEMPLATE}#run-notice", {"run": run, "notice": notice, "notice_level": level}
    )
    return HttpResponse(html)


def _go_to(request: HttpRequest, run: Run, notice: str) -> HttpResponse:
    """To the page of the run an action started (the message shows there)."""
    messages.success(request, notice)
    if request.htmx:
        return HttpResponseClientRedirect(reverse("run-detail", args=[run.pk]))
    return redirect("run-detail", run.pk)


def _errors(exc: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])


# --- downloads ----------------------------------------------------------------------------------------------


@require_GET
@login_required
def run_payload_download(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = get_object_or_404(Run.objects.only("id", "payload"), pk=run_id)
    return _json_download(run.payload, f"run-{run.pk}-payload.json")


@require_GET
@login_required
def run_output_download(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = get_object_or_404(Run.objects.only("id", "output"), pk=run_id)
    return _json_download(run.output, f"run-{run.pk}-output.json")


@require_GET
@login_required
def step_output_download(request: HttpRequest, run_id: UUID, step_pk: int) -> HttpResponse:
    step = get_object_or_404(Step.objects.only("id", "run_id", "key", "output"), pk=step_pk, run_id=run_id)
    return _json_download(step.output, f"run-{run_id}-step-{step.pk}-output.json")


def _json_download(value: Any, filename: str) -> HttpResponse:
    # An attachment served as JSON (with nosniff from SecurityMiddleware): never rendered as a page.
    response = HttpResponse(
        json.dumps(value, indent=2, ensure_ascii=False, default=str), content_type="application/json"
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
