"""The Runs list (`/`), bulk actions on runs (`/runs/bulk/`) and the audit log (`/audit/`).

Thin: filters come from runs.web.run_filters, reads from runs.selectors / runs.web.fragments (the same reads the
run-list socket uses), writes from runs.services. `request.htmx` only picks the partial to render.
"""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, QueryDict
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.middleware import HtmxDetails

from runs import selectors, services
from runs.ops.audit import Actor, is_operator
from runs.web import fragments
from runs.web.permissions import operator_required
from runs.web.run_filters import FILTER_FIELDS, RunFilterForm, filter_querystring


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


RUN_BULK_TEMPLATE = "runs/run_bulk.html"
AUDIT_LIST_TEMPLATE = "runs/audit_list.html"


@require_GET
@login_required
def run_list(request: HtmxHttpRequest) -> HttpResponse:
    form = RunFilterForm(request.GET)
    filters = form.filters()
    cursor = request.GET.get("cursor") or None
    try:
        page = selectors.run_list(
            statuses=filters.statuses,
            task_id=filters.task_id,
            tag=filters.tag,
            version=filters.version,
            created_after=filters.created_after,
            created_before=filters.created_before,
            search=filters.search,
            cursor=cursor,
            limit=fragments.RUN_LIST_LIMIT,
            top_level=filters.top_level,
        )
    except selectors.InvalidCursor:
        return HttpResponseBadRequest("not a cursor from a previous page")
    fragments.annotate_child_counts(page.items)
    filter_qs = filter_querystring(request.GET)
    context = {
        "runs": page.items,
        "next_cursor": page.next_cursor,
        "cursor": cursor,
        "form": form,
        "filter_qs": filter_qs,
        "filter_pairs": _filter_pairs(request.GET),
        "filtered": not filters.is_empty,
        "is_operator": is_operator(request.user),
        # Only the first page is live: a later page is a fixed window into the past.
        "live_url": None if cursor else "/ws/runs/" + (f"?{filter_qs}" if filter_qs else ""),
    }
    template_name = fragments.RUN_LIST_TEMPLATE
    if request.htmx:
        template_name += "#runs-live"
    else:
        context["counters"] = fragments.run_list_counters()
    return render(request, template_name, context)


@require_GET
@login_required
def run_children(request: HtmxHttpRequest, run_id: UUID) -> HttpResponse:
    """A run's child runs, nested under its row in the list (loaded when the row is expanded)."""
    children = fragments.run_children(run_id)
    return render(request, f"{fragments.RUN_LIST_TEMPLATE}#run-children", {"children": children, "parent_id": run_id})


@require_POST
@operator_required
def runs_bulk(request: HtmxHttpRequest) -> HttpResponse:
    """A bulk action in two steps: without `confirm`, the dry run (how many runs, a sample); with it, act."""
    action = request.POST.get("action", "")
    if action not in services.BULK_ACTIONS:
        return HttpResponseBadRequest(f"unknown action {action[:50]!r}")
    by_filter = request.POST.get("scope") == "filter"
    filters = RunFilterForm(request.POST).filters() if by_filter else None
    run_ids = None if by_filter else request.POST.getlist("run_ids")
    context = {
        "action": action,
        "scope": "filter" if by_filter else "selection",
        "run_ids": run_ids or [],
        "filter_pairs": _filter_pairs(request.POST) if by_filter else [],
        "filter_qs": filter_querystring(request.POST) if by_filter else "",
    }
    if request.POST.get("confirm"):
        upto = request.POST.get("upto") or None
        try:
            context["result"] = services.runs_bulk_apply(
                by=Actor.web(request.user),
                action=action,  # type: ignore[arg-type]
                run_ids=run_ids,
                filters=filters,
                upto=UUID(upto) if upto else None,
            )
        except ValueError as exc:
            return HttpResponseBadRequest(str(exc))
        partial = "bulk-result"
    else:
        context["preview"] = services.runs_bulk_preview(
            action=action,  # type: ignore[arg-type]
            run_ids=run_ids,
            filters=filters,
        )
        partial = "bulk-confirm"
    template_name = RUN_BULK_TEMPLATE
    if request.htmx:
        template_name += f"#{partial}"
    return render(request, template_name, context)


@require_GET
@login_required
def audit_list(request: HtmxHttpRequest) -> HttpResponse:
    before = request.GET.get("before", "")
    page = selectors.audit_entries(before=int(before) if before.isdigit() else None)
    context = {"entries": page.items, "next_before": page.next_before, "paged": bool(before)}
    template_name = AUDIT_LIST_TEMPLATE
    if request.htmx:
        template_name += "#audit-rows"
    return render(request, template_name, context)


def _filter_pairs(data: QueryDict) -> list[tuple[str, str]]:
    """The filter fields as (name, value) pairs, for hidden inputs that carry the filter into a POST."""
    return [(key, value) for key in FILTER_FIELDS for value in data.getlist(key) if value]
