"""Dashboard URLs (DESIGN.md §6: part of the contract, people bookmark them)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from runs.web import alerts, pages, run_list, run_page

urlpatterns = [
    path("", run_list.run_list, name="run-list"),
    path("runs/bulk/", run_list.runs_bulk, name="runs-bulk"),
    path("audit/", run_list.audit_list, name="audit-list"),
    path("runs/<uuid:run_id>/", run_page.run_detail, name="run-detail"),
    path("runs/<uuid:run_id>/children/", run_list.run_children, name="run-children"),
    path("runs/<uuid:run_id>/step/", run_page.run_step, name="run-step"),
    path("runs/<uuid:run_id>/trace/", run_page.run_trace, name="run-trace"),
    path("runs/<uuid:run_id>/cancel/", run_page.run_cancel, name="run-cancel"),
    path("runs/<uuid:run_id>/retry/", run_page.run_retry, name="run-retry"),
    path("runs/<uuid:run_id>/replay/", run_page.run_replay, name="run-replay"),
    path("runs/<uuid:run_id>/steps/<int:step_pk>/fork/", run_page.run_fork, name="run-fork"),
    path(
        "runs/<uuid:run_id>/waitpoints/<int:waitpoint_id>/complete/",
        run_page.run_waitpoint_complete,
        name="run-waitpoint-complete",
    ),
    path("runs/<uuid:run_id>/payload.json", run_page.run_payload_download, name="run-payload"),
    path("runs/<uuid:run_id>/output.json", run_page.run_output_download, name="run-output"),
    path("runs/<uuid:run_id>/steps/<int:step_pk>/output.json", run_page.step_output_download, name="step-output"),
    path("tasks/", pages.task_list, name="task-list"),
    path("tasks/<str:task_id>/", pages.task_detail, name="task-detail"),
    path("events/", pages.event_list, name="event-list"),
    path("approvals/", pages.approval_list, name="approval-list"),
    path("approvals/<int:waitpoint_id>/", pages.approval_complete, name="approval-complete"),
    path("schedules/", pages.schedule_list, name="schedule-list"),
    path("schedules/<int:schedule_id>/", pages.schedule_edit, name="schedule-edit"),
    path("schedules/<int:schedule_id>/delete/", pages.schedule_remove, name="schedule-delete"),
    path("usage/", pages.usage, name="usage"),
    path("alerts/", alerts.alert_list, name="alert-list"),
    path("alerts/<int:destination_id>/", alerts.alert_edit, name="alert-edit"),
    path("alerts/<int:destination_id>/delete/", alerts.alert_delete, name="alert-delete"),
    path("alerts/<int:destination_id>/test/", alerts.alert_test, name="alert-test"),
    path("api-keys/", pages.apikey_list, name="apikey-list"),
    path("api-keys/<int:key_id>/revoke/", pages.apikey_revoke, name="apikey-revoke"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
