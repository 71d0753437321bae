from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from runs import services
from runs.models import ApiKey, LogLine, Run, Schedule, ScheduleSource, Step
from runs.ops import schedules
from runs.ops.audit import Actor


class StepInline(admin.TabularInline):
    model = Step
    extra = 0
    fields = ("seq", "key", "kind", "status", "attempts", "started_at", "finished_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ("id", "task_id", "status", "created_at", "started_at", "finished_at", "recoveries")
    list_filter = ("status", "task_id", "created_at")
    search_fields = ("id", "task_id", "idempotency_key", "tags")
    readonly_fields = (
        "id",
        "task_id",
        "status",
        "payload",
        "output",
        "error",
        "metadata",
        "parent",
        "replay_of",
        "created_at",
        "started_at",
        "finished_at",
        "wake_at",
        "lease_owner",
        "lease_token",
        "lease_expires_at",
        "recoveries",
        "executions",
        "cancel_requested_at",
    )
    inlines = [StepInline]
    actions = ["retry_runs", "cancel_runs", "replay_runs"]
    show_full_result_count = False

    @admin.action(description="Retry selected runs from their failed step")
    def retry_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._apply(request, queryset, services.run_retry, "retried")

    @admin.action(description="Cancel selected runs")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._apply(request, queryset, services.run_cancel, "cancelled")

    @admin.action(description="Replay selected runs (new runs, same payload)")
    def replay_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._apply(request, queryset, services.run_replay, "replayed")

    def _apply(self, request: HttpRequest, queryset: QuerySet[Run], action, verb: str) -> None:
        done, skipped = 0, []
        for run in queryset:
            try:
                action(run=run, by=Actor.web(request.user, via="admin"))
                done += 1
            except services.RunStateError as exc:
                skipped.append(str(exc))
        self.message_user(request, f"{done} run(s) {verb}.", messages.SUCCESS)
        for reason in skipped[:10]:
            self.message_user(request, reason, messages.WARNING)


@admin.register(Step)
class StepAdmin(admin.ModelAdmin):
    list_display = ("run", "seq", "key", "kind", "status", "attempts", "finished_at")
    list_filter = ("status", "kind")
    search_fields = ("key", "run__id")
    raw_id_fields = ("run",)


@admin.register(LogLine)
class LogLineAdmin(admin.ModelAdmin):
    list_display = ("run", "step_key", "ts", "level", "message")
    list_filter = ("level",)
    raw_id_fields = ("run",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")


class ScheduleAdminForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = ("task_id", "cron", "timezone", "payload", "enabled")

    def clean(self) -> dict:
        data = super().clean()
        try:
            schedules.schedule_validate(
                task_id=data.get("task_id", self.instance.task_id),
                cron=data.get("cron", ""),
                timezone=data.get("timezone", ""),
                payload=data.get("payload"),
            )
        except schedules.ScheduleInvalid as exc:
            for field, errors in exc.message_dict.items():
                self.add_error(field if field in self.fields else None, errors)
        return data


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    """Saves through runs.ops.schedules (validation, next_run_at); code schedules are read-only here."""

    form = ScheduleAdminForm
    list_display = ("task_id", "cron", "timezone", "enabled", "source", "next_run_at", "last_run_at", "last_error")
    list_filter = ("enabled", "source", "task_id")
    search_fields = ("task_id", "cron")
    readonly_fields = ("source", "next_run_at", "last_run_at", "last_run", "last_error", "created_at", "updated_at")
    raw_id_fields = ("last_run",)

    def get_readonly_fields(self, request: HttpRequest, obj: Schedule | None = None) -> tuple[str, ...]:
        # A schedule keeps its task: schedule_update doesn't move one to another task.
        return ("task_id", *self.readonly_fields) if obj is not None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: Schedule | None = None) -> bool:
        return super().has_change_permission(request, obj) and (obj is None or obj.source != ScheduleSource.CODE)

    def has_delete_permission(self, request: HttpRequest, obj: Schedule | None = None) -> bool:
        return super().has_delete_permission(request, obj) and (obj is None or obj.source != ScheduleSource.CODE)

    def save_model(self, request: HttpRequest, obj: Schedule, form: forms.ModelForm, change: bool) -> None:
        fields = {"cron": obj.cron, "timezone": obj.timezone, "payload": obj.payload, "enabled": obj.enabled}
        if change:
            schedules.schedule_update(schedule=obj, by=Actor.web(request.user, via="admin"), **fields)
        else:
            created = schedules.schedule_create(task_id=obj.task_id, by=Actor.web(request.user, via="admin"), **fields)
            obj.pk = created.pk
            obj.refresh_from_db()

    def delete_model(self, request: HttpRequest, obj: Schedule) -> None:
        schedules.schedule_delete(schedule=obj, by=Actor.web(request.user, via="admin"))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset.filter(source=ScheduleSource.USER):
            schedules.schedule_delete(schedule=schedule, by=Actor.web(request.user, via="admin"))
