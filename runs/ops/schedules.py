"""Cron schedules: create, change and delete them, sync the ones declared in code, and fire the due ones.

A schedule's `next_run_at` is its next slot (UTC). The scheduler calls `schedules_fire()` every tick: it
starts one run per due slot and moves `next_run_at` on. Two kinds of schedule exist:

- "code" schedules come from `@task(schedule="...")` and are owned by code: `schedules_sync_from_code()`
  (run when a scheduler starts) creates, updates and disables them; the services below refuse to edit them,
  as Trigger.dev does with its declarative schedules — change the decorator instead.
- "user" schedules are made in the dashboard, the API or the admin, through the services below.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
from croniter import croniter
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models.functions import Now

from runs import services
from runs.models import Run, Schedule, ScheduleSource
from runs.ops.audit import Actor, audit_record
from runs.sdk.registry import UnknownTask, registry
from runs.text import describe, find_unstorable, unstorable_reason

log = logging.getLogger("dex.schedules")

CRON_FIELDS = "minute hour day-of-month month day-of-week"


class ScheduleInvalid(ValidationError):
    """The schedule's input is wrong. Raised with a dict, so `.message_dict` maps each field (task_id, cron,
    timezone, payload) to its messages — a form shows them field by field, the API returns them as details."""


class ScheduleOwnedByCode(Exception):
    """The schedule is declared by `@task(schedule=...)`: change the code, not the row."""


# --- cron arithmetic -----------------------------------------------------------------------------------------


def cron_next(cron: str, tz: str, *, after: datetime) -> datetime:
    """The first slot of `cron`, read as wall-clock time in zone `tz`, strictly after `after` (aware, UTC)."""
    start = after.astimezone(ZoneInfo(tz))
    return croniter(cron, start).get_next(datetime).astimezone(UTC)


def _db_now() -> datetime:
    # Slots are compared with Postgres's clock when firing, so they are computed from it too: a scheduler
    # machine whose clock runs ahead must not skip the slot that is about to come.
    with connection.cursor() as cur:
        cur.execute("SELECT now()")
        return cur.fetchone()[0]


# --- validation ----------------------------------------------------------------------------------------------

_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, start=1)}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, lowest, highest, names): day-of-week 7 is Sunday again, as in every cron.
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
_PART = re.compile(r"^(?P<base>\*|(?P<lo>[0-9a-z]+)(?:-(?P<hi>[0-9a-z]+))?)(?:/(?P<step>[0-9]+))?$")


def cron_field_errors(cron: str) -> list[str]:
    """What is wrong with each field of a five-field `cron`, field by field (empty: nothing). croniter accepts
    reversed ranges (`5-1`), steps of any size (`*/99999999999999999999`) and `7-1` for day-of-week, reading
    each as something nobody meant; they are refused here with the field named. croniter's own extensions
    (`L`, `#`, `?`) are left to croniter."""
    errors = []
    for text, (field, lowest, highest, names) in zip(cron.lower().split(), _FIELDS, strict=True):
        name = f"the cron's {field} field"
        for part in text.split(","):
            if any(ch in part for ch in "l#?") and field in ("day-of-month", "day-of-week"):
                continue
            match = _PART.match(part)
            if not match:
                errors.append(f"{name}: {part!r} is not a value, a range (1-5), * or a step (*/15, 1-30/5)")
                continue
            lo_text, hi_text, step = match["lo"], match["hi"], match["step"]
            bounds = [(t, _cron_value(t, lowest, highest, names)) for t in (lo_text, hi_text) if t is not None]
            bad = [t for t, v in bounds if v is None]
            if bad:
                errors.append(f"{name}: {bad[0]!r} is not a number from {lowest} to {highest}")
                continue
            if hi_text is not None and bounds[0][1] > bounds[1][1]:  # type: ignore[operator]
                errors.append(f"{name}: the range {lo_text}-{hi_text} runs backwards (cron ranges don't wrap around)")
            if step is not None and not 1 <= int(step) <= highest:
                errors.append(f"{name}: the step /{step} is out of range (1 to {highest})")
    return list(dict.fromkeys(errors))


def _cron_value(token: str, lowest: int, highest: int, names: dict[str, int]) -> int | None:
    number = int(token) if token.isdigit() else names.get(token)
    return number if number is not None and lowest <= number <= highest else None


def schedule_validate(*, task_id: str, cron: str, timezone: str, payload: Any) -> tuple[str, str, dict]:
    """Check a schedule's fields together. Returns (cron, timezone, payload) normalised (single spaces, the
    payload as the task stores it); raises ScheduleInvalid naming every bad field."""
    errors: dict[str, list[str]] = {}
    cron = " ".join(str(cron or "").split())
    cron_ok = tz_ok = False
    if len(cron.split()) != 5:
        errors["cron"] = [f"a cron expression has five fields ({CRON_FIELDS}); got {cron!r}"]
    elif unstorable_reason(cron):
        errors["cron"] = [f"the cron expression is not valid: {unstorable_reason(cron)}"]
    elif field_errors := cron_field_errors(cron):
        errors["cron"] = field_errors
    elif not croniter.is_valid(cron):
        errors["cron"] = [f"{cron!r} is not a valid cron expression ({CRON_FIELDS})"]
    else:
        cron_ok = True
    try:
        ZoneInfo(str(timezone))
        tz_ok = True
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        errors["timezone"] = [f"{timezone!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Paris')"]
    if cron_ok and tz_ok:
        try:
            cron_next(cron, timezone, after=datetime.now(UTC))
        except (ValueError, KeyError, TypeError):  # croniter's errors are ValueErrors (e.g. "0 0 31 2 *")
            errors["cron"] = [f"{cron!r} never matches a date"]
    try:
        task = registry.get(task_id)
    except UnknownTask as exc:
        errors["task_id"] = [str(exc)]
    else:
        try:
            payload = task.validate_payload(payload)
        except pydantic.ValidationError as exc:
            errors["payload"] = [
                f"{'.'.join(str(part) for part in err['loc']) or 'payload'}: {err['msg']}" for err in exc.errors()
            ]
        else:
            # Postgres's jsonb can't hold a NUL or a lone surrogate; found here, it is a form error, not a 500.
            found = find_unstorable(payload)
            if found:
                errors["payload"] = [describe(found)]
    if errors:
        raise ScheduleInvalid(errors)
    return cron, str(timezone), payload


# --- services ------------------------------------------------------------------------------------------------


def schedule_create(
    *, task_id: str, cron: str, by: Actor, timezone: str = "UTC", payload: dict | None = None, enabled: bool = True
) -> Schedule:
    """Create a user schedule. Raises ScheduleInvalid."""
    cron, timezone, stored = schedule_validate(task_id=task_id, cron=cron, timezone=timezone, payload=payload)
    with transaction.atomic():
        schedule = Schedule.objects.create(
            task_id=task_id,
            cron=cron,
            timezone=timezone,
            payload=stored,
            enabled=enabled,
            source=ScheduleSource.USER,
            next_run_at=cron_next(cron, timezone, after=_db_now()) if enabled else None,
        )
        audit_record(by=by, action="schedule_create", schedule=schedule.pk, task=task_id, cron=cron)
    return schedule


def schedule_update(
    *,
    schedule: Schedule,
    by: Actor,
    cron: str | None = None,
    timezone: str | None = None,
    payload: dict | None = None,
    enabled: bool | None = None,
) -> Schedule:
    """Change a user schedule (None leaves a field as it is). A new cron or time zone, or enabling it, moves
    `next_run_at` to the next slot from now. Raises ScheduleInvalid and ScheduleOwnedByCode."""
    if schedule.source == ScheduleSource.CODE:
        raise ScheduleOwnedByCode(f"the schedule of {schedule.task_id!r} is declared in code; change @task(schedule=)")
    with transaction.atomic():
        # Locked, so a scheduler firing this schedule right now finishes first and we see its next_run_at.
        row = Schedule.objects.select_for_update().get(pk=schedule.pk)
        new_cron, new_tz, new_payload = schedule_validate(
            task_id=row.task_id,
            cron=row.cron if cron is None else cron,
            timezone=row.timezone if timezone is None else timezone,
            payload=row.payload if payload is None else payload,
        )
        new_enabled = row.enabled if enabled is None else enabled
        retime = new_cron != row.cron or new_tz != row.timezone or (new_enabled and not row.enabled)
        row.cron, row.timezone, row.payload, row.enabled = new_cron, new_tz, new_payload, new_enabled
        fields = ["cron", "timezone", "payload", "enabled", "updated_at"]
        if not new_enabled:
            row.next_run_at = None
            fields.append("next_run_at")
        elif retime or row.next_run_at is None:
            row.next_run_at = cron_next(new_cron, new_tz, after=_db_now())
            fields.append("next_run_at")
        row.save(update_fields=fields)
        audit_record(by=by, action="schedule_update", schedule=row.pk, task=row.task_id, cron=row.cron)
    schedule.refresh_from_db()
    return schedule


def schedule_delete(*, schedule: Schedule, by: Actor) -> None:
    """Delete a user schedule (its runs stay). Raises ScheduleOwnedByCode."""
    if schedule.source == ScheduleSource.CODE:
        raise ScheduleOwnedByCode(f"the schedule of {schedule.task_id!r} is declared in code; remove @task(schedule=)")
    with transaction.atomic():
        audit_record(by=by, action="schedule_delete", schedule=schedule.pk, task=schedule.task_id, cron=schedule.cron)
        schedule.delete()


@dataclass
class SyncResult:
    created: int = 0
    updated: int = 0
    disabled: int = 0


def schedules_sync_from_code() -> SyncResult:
    """Make the "code" schedules match the registry's `@task(schedule=...)`: create the missing ones, update
    a changed cron (and re-enable one whose task declares a schedule again), disable those whose task no
    longer declares one (or is gone). A declared schedule that doesn't validate is logged and skipped.

    Run when a scheduler starts; several may run it at once (the unique code schedule per task and
    get_or_create keep one row). Every scheduler must load the same agent modules (DEX_AGENT_MODULES):
    one that doesn't know a task would disable its schedule.
    """
    result = SyncResult()
    declared = [t for t in registry.all() if t.schedule]
    now = _db_now()
    for task in declared:
        try:
            cron, timezone, payload = schedule_validate(
                task_id=task.id, cron=task.schedule or "", timezone="UTC", payload={}
            )
        except ScheduleInvalid as exc:
            log.error("task %s: schedule=%r is not usable, not scheduling it: %s", task.id, task.schedule, exc)
            continue
        with transaction.atomic():
            schedule, created = Schedule.objects.select_for_update().get_or_create(
                task_id=task.id,
                source=ScheduleSource.CODE,
                defaults={
                    "cron": cron,
                    "timezone": timezone,
                    "payload": payload,
                    "next_run_at": cron_next(cron, timezone, after=now),
                },
            )
            if created:
                result.created += 1
                log.info("task %s: created its schedule %r", task.id, cron)
                continue
            current = (schedule.cron, schedule.timezone, schedule.payload, schedule.enabled)
            if current == (cron, timezone, payload, True) and schedule.next_run_at is not None:
                continue
            retime = cron != schedule.cron or timezone != schedule.timezone or not schedule.enabled
            schedule.cron, schedule.timezone, schedule.payload, schedule.enabled = cron, timezone, payload, True
            if retime or schedule.next_run_at is None:
                schedule.next_run_at = cron_next(cron, timezone, after=now)
            schedule.save(update_fields=["cron", "timezone", "payload", "enabled", "next_run_at", "updated_at"])
            result.updated += 1
            log.info("task %s: updated its schedule to %r", task.id, cron)
    result.disabled = (
        Schedule.objects.filter(source=ScheduleSource.CODE, enabled=True)
        .exclude(task_id__in=[t.id for t in declared])
        .update(enabled=False, next_run_at=None)
    )
    if result.disabled:
        log.info("disabled %d code schedule(s) whose task no longer declares one", result.disabled)
    return result


def schedules_fire(*, batch: int = 100) -> list[Run]:
    """Start one run for each enabled schedule whose `next_run_at` has passed (Postgres's `now()`), and move
    the schedule to its next slot after now. Returns the runs started.

    Missed slots are skipped, not caught up: after downtime a schedule fires once (for the oldest missed
    slot), then waits for its next slot in the future — no burst of runs for every minute the scheduler was
    away.

    Exactly once per slot across any number of schedulers: the due rows are taken FOR UPDATE SKIP LOCKED and
    moved on in the same short transaction, so a second scheduler either skips them or (after the commit)
    no longer finds them due; and each run carries the idempotency key "schedule:<id>:<slot>", so even a
    slot fired twice would return the first run. When nothing is due this costs one indexed query.
    """
    if not Schedule.objects.filter(enabled=True, next_run_at__lte=Now()).exists():
        return []
    fired: list[Run] = []
    with transaction.atomic():
        due = list(
            Schedule.objects.select_for_update(skip_locked=True)
            .filter(enabled=True, next_run_at__lte=Now())
            .annotate(db_now=Now())
            .order_by("next_run_at")[:batch]
        )
        for schedule in due:
            slot = schedule.next_run_at
            run = _fire_slot(schedule, slot)
            fields = ["next_run_at", "last_error"]
            if run is not None:
                fired.append(run)
                schedule.last_run, schedule.last_run_at = run, schedule.db_now
                fields += ["last_run", "last_run_at"]
            try:
                schedule.next_run_at = cron_next(schedule.cron, schedule.timezone, after=schedule.db_now)
            except (ValueError, KeyError, TypeError) as exc:
                # Only a row written around the services (raw SQL) gets here; firing it again would loop.
                schedule.enabled, schedule.next_run_at = False, None
                schedule.last_error = f"disabled: cannot compute the next slot of {schedule.cron!r}: {exc}"
                fields.append("enabled")
                log.error("schedule %s: %s", schedule.id, schedule.last_error)
            schedule.save(update_fields=fields)
    return fired


def _fire_slot(schedule: Schedule, slot: datetime) -> Run | None:
    """Trigger the run of one slot; None (and `last_error` set) if the task or payload no longer allows it."""
    try:
        run, created = services.run_trigger(
            task_id=schedule.task_id,
            payload=schedule.payload,
            idempotency_key=f"schedule:{schedule.id}:{slot.isoformat()}",
            tags=["schedule"],
        )
    except (UnknownTask, pydantic.ValidationError) as exc:
        schedule.last_error = f"slot {slot.isoformat()} started no run: {exc}"
        log.warning("schedule %s (%s): %s", schedule.id, schedule.task_id, schedule.last_error)
        return None
    schedule.last_error = ""
    if created:
        log.info("schedule %s (%s) fired slot %s: run %s", schedule.id, schedule.task_id, slot.isoformat(), run.id)
    else:
        log.warning(
            "schedule %s (%s) slot %s had already fired: run %s",
            schedule.id,
            schedule.task_id,
            slot.isoformat(),
            run.id,
        )
    return run
