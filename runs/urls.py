"""Dashboard URLs (DESIGN.md §6: part of the contract, people bookmark them)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from runs import views_alerts, views_pages, views_run, views_runs

urlpatterns = [
    path("", views_runs.run_list, name="run-list"),
    path("runs/bulk/", views_runs.runs_bulk, name="runs-bulk"),
    path("audit/", views_runs.audit_list, name="audit-list"),
    path("runs/<uuid:run_id>/", views_run.run_detail, name="run-detail"),
    path("runs/<uuid:run_id>/cancel/", views_run.run_cancel, name="run-cancel"),
    path("runs/<uuid:run_id>/retry/", views_run.run_retry, name="run-retry"),
    path("runs/<uuid:run_id>/replay/", views_run.run_replay, name="run-replay"),
    path("runs/<uuid:run_id>/steps/<int:step_pk>/fork/", views_run.run_fork, name="run-fork"),
    path(
        "runs/<uuid:run_id>/waitpoints/<int:waitpoint_id>/complete/",
        views_run.run_waitpoint_complete,
        name="run-waitpoint-complete",
    ),
    path("runs/<uuid:run_id>/payload.json", views_run.run_payload_download, name="run-payload"),
    path("runs/<uuid:run_id>/output.json", views_run.run_output_download, name="run-output"),
    path("runs/<uuid:run_id>/steps/<int:step_pk>/output.json", views_run.step_output_download, name="step-output"),
    path("tasks/", views_pages.task_list, name="task-list"),
    path("tasks/<str:task_id>/", views_pages.task_detail, name="task-detail"),
    path("events/", views_pages.event_list, name="event-list"),
    path("approvals/", views_pages.approval_list, name="approval-list"),
    path("approvals/<int:waitpoint_id>/", views_pages.approval_complete, name="approval-complete"),
    path("schedules/", views_pages.schedule_list, name="schedule-list"),
    path("schedules/<int:schedule_id>/", views_pages.schedule_edit, name="schedule-edit"),
    path("schedules/<int:schedule_id>/delete/", views_pages.schedule_remove, name="schedule-delete"),
    path("usage/", views_pages.usage, name="usage"),
    path("alerts/", views_alerts.alert_list, name="alert-list"),
    path("alerts/<int:destination_id>/", views_alerts.alert_edit, name="alert-edit"),
    path("alerts/<int:destination_id>/delete/", views_alerts.alert_delete, name="alert-delete"),
    path("alerts/<int:destination_id>/test/", views_alerts.alert_test, name="alert-test"),
    path("api-keys/", views_pages.apikey_list, name="apikey-list"),
    path("api-keys/<int:key_id>/revoke/", views_pages.apikey_revoke, name="apikey-revoke"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
