"""Cron schedules: validation, firing (once per slot, missed slots skipped) and the sync of code schedules."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db.models.functions import Now

from runs.models import Run, Schedule, ScheduleSource
from runs.ops import schedules
from runs.ops.audit import Actor
from runs.ops.schedules import ScheduleInvalid, ScheduleOwnedByCode
from runs.sdk import task
from runs.sdk.registry import registry

pytestmark = pytest.mark.django_db


@task("u-sched-code", schedule="*/5 * * * *")
def code_scheduled(ctx) -> str:
    return "tick"


@task("u-sched-plain")
def plain(ctx, name: str, count: int = 1) -> str:
    return name * count


def _db_now():
    return schedules._db_now()


def _make_due(schedule: Schedule, ago: timedelta = timedelta(minutes=1)) -> None:
    """Put the schedule's slot in the past (a whole minute, as a real `* * * * *` slot would be)."""
    slot = (_db_now() - ago).replace(second=0, microsecond=0)
    Schedule.objects.filter(pk=schedule.pk).update(next_run_at=slot)
    schedule.refresh_from_db()


def _invalid(**fields) -> dict:
    args = {"task_id": "u-sched-plain", "cron": "* * * * *", "timezone": "UTC", "payload": {"name": "a"}, **fields}
    with pytest.raises(ScheduleInvalid) as info:
        schedules.schedule_create(**args, by=Actor.system("tests"))
    assert Schedule.objects.count() == 0
    return info.value.message_dict


# --- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cron", ["* * * *", "* * * * * *", "@hourly", "61 * * * *", "*/0 * * * *", "a b c d e", ""])
def test_it_rejects_a_cron_that_is_not_five_valid_fields(cron):
    errors = _invalid(cron=cron)
    assert list(errors) == ["cron"]
    assert "cron" in errors["cron"][0] or "five fields" in errors["cron"][0]


@pytest.mark.parametrize("cron", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *"])
def test_it_rejects_a_cron_that_never_matches(cron):
    assert _invalid(cron=cron) == {"cron": [f"{cron!r} never matches a date"]}


@pytest.mark.parametrize(
    "cron, message",
    [
        ("1-0 * * * *", "the cron's minute field: the range 1-0 runs backwards (cron ranges don't wrap around)"),
        ("* 23-5 * * *", "the cron's hour field: the range 23-5 runs backwards"),
        ("* * * * 7-1", "the cron's day-of-week field: the range 7-1 runs backwards"),
        ("* * * * fri-mon", "the cron's day-of-week field: the range fri-mon runs backwards"),
        ("*/99999999999999999999 * * * *", "the cron's minute field: the step /99999999999999999999 is out of range"),
        ("*/60 * * * *", "the cron's minute field: the step /60 is out of range (1 to 59)"),
        ("0 0 1-31/40 * *", "the cron's day-of-month field: the step /40 is out of range (1 to 31)"),
        ("0 0 * 13 *", "the cron's month field: '13' is not a number from 1 to 12"),
        ("0 0 * * 8", "the cron's day-of-week field: '8' is not a number from 0 to 7"),
        ("0,,5 * * * *", "the cron's minute field: '' is not a value"),
        ("0 0 * * 1\x00", "the cron expression is not valid: text can't contain NUL"),
    ],
)
def test_it_rejects_a_cron_field_that_croniter_would_read_as_something_else(cron, message):
    errors = _invalid(cron=cron)
    assert list(errors) == ["cron"]
    assert errors["cron"][0].startswith(message), errors["cron"]


@pytest.mark.parametrize(
    "cron",
    ["0 9 * * 1-5", "*/15 * * * *", "0 0 * * 0-7", "0 0 1 jan *", "0 0 * * MON-FRI", "5-55/10 * * * *", "0 0 L * *"],
)
def test_it_accepts_the_crons_people_write(cron):
    schedules.schedule_validate(task_id="u-sched-plain", cron=cron, timezone="UTC", payload={"name": "a"})


@pytest.mark.parametrize("payload", [{"name": "a\x00"}, {"name": "\ud800"}])
def test_it_rejects_a_payload_postgres_cannot_store(payload):
    errors = _invalid(payload=payload)
    assert list(errors) == ["payload"]
    assert errors["payload"][0].startswith("name: text can't contain NUL") or "valid Unicode" in errors["payload"][0]


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "", "../etc/passwd"])
def test_it_rejects_an_unknown_timezone(tz):
    errors = _invalid(timezone=tz)
    assert list(errors) == ["timezone"]
    assert "IANA" in errors["timezone"][0]


def test_it_rejects_an_unknown_task():
    assert _invalid(task_id="no-such-task") == {"task_id": ["no task named 'no-such-task' is registered"]}


def test_it_validates_the_payload_against_the_task():
    errors = _invalid(payload={"count": "many"})
    assert sorted(errors["payload"]) == [
        "count: Input should be a valid integer, unable to parse string as an integer",
        "name: Field required",
    ]


def test_it_reports_every_bad_field_at_once():
    errors = _invalid(cron="nope", timezone="Nowhere/City", payload={})
    assert set(errors) == {"cron", "timezone", "payload"}


def test_it_creates_a_user_schedule_with_its_next_slot_in_its_timezone():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain",
        cron="0  9 * * 1-5",
        timezone="America/New_York",
        payload={"name": "a"},
        by=Actor.system("tests"),
    )
    assert schedule.source == ScheduleSource.USER
    assert schedule.cron == "0 9 * * 1-5"  # normalised
    assert schedule.payload == {"name": "a", "count": 1}  # stored as the task will receive it
    local = schedule.next_run_at.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute, local.weekday() < 5) == (9, 0, True)
    assert schedule.next_run_at > _db_now()


def test_it_moves_the_next_slot_when_the_cron_changes_and_clears_it_when_disabled():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="0 0 1 1 *", payload={"name": "a"}, by=Actor.system("tests")
    )
    schedules.schedule_update(schedule=schedule, cron="* * * * *", by=Actor.system("tests"))
    assert schedule.next_run_at - _db_now() <= timedelta(minutes=1)
    schedules.schedule_update(schedule=schedule, enabled=False, by=Actor.system("tests"))
    assert (schedule.enabled, schedule.next_run_at) == (False, None)
    schedules.schedule_update(schedule=schedule, enabled=True, by=Actor.system("tests"))
    assert schedule.next_run_at is not None
    with pytest.raises(ScheduleInvalid):
        schedules.schedule_update(schedule=schedule, payload={"name": 3}, by=Actor.system("tests"))
    schedule.refresh_from_db()
    assert schedule.payload == {"name": "a", "count": 1}


def test_it_refuses_to_edit_or_delete_a_code_schedule():
    schedules.schedules_sync_from_code()
    schedule = Schedule.objects.get(task_id="u-sched-code")
    with pytest.raises(ScheduleOwnedByCode):
        schedules.schedule_update(schedule=schedule, cron="* * * * *", by=Actor.system("tests"))
    with pytest.raises(ScheduleOwnedByCode):
        schedules.schedule_delete(schedule=schedule, by=Actor.system("tests"))
    user = schedules.schedule_create(task_id="u-sched-code", cron="* * * * *", by=Actor.system("tests"))
    schedules.schedule_delete(schedule=user, by=Actor.system("tests"))
    assert Schedule.objects.filter(task_id="u-sched-code").count() == 1


# --- firing --------------------------------------------------------------------------------------------------


def test_it_does_nothing_when_nothing_is_due(django_assert_num_queries):
    schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    with django_assert_num_queries(1):  # the scheduler's idle cost: one indexed probe
        assert schedules.schedules_fire() == []


def test_it_fires_a_due_schedule_and_advances_it_past_now():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    _make_due(schedule)
    slot = schedule.next_run_at
    [run] = schedules.schedules_fire()
    assert (run.task_id, run.payload, run.tags) == ("u-sched-plain", {"name": "a", "count": 1}, ["schedule"])
    assert run.idempotency_key == f"schedule:{schedule.id}:{slot.isoformat()}"
    schedule.refresh_from_db()
    now = _db_now()
    assert now < schedule.next_run_at <= now + timedelta(minutes=1)
    assert (schedule.next_run_at.second, schedule.next_run_at.microsecond) == (0, 0)
    assert schedule.last_run == run
    assert schedule.last_run_at is not None
    assert schedule.last_error == ""


def test_it_fires_a_slot_once_even_if_fire_is_called_twice():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    _make_due(schedule)
    slot = schedule.next_run_at
    [run] = schedules.schedules_fire()
    assert schedules.schedules_fire() == []
    # Even if the same slot came up again (a lost update, a racing scheduler), its idempotency key returns
    # the run it already started instead of a second one.
    Schedule.objects.filter(pk=schedule.pk).update(next_run_at=slot)
    assert schedules.schedules_fire() == [run]
    assert Run.objects.filter(task_id="u-sched-plain").count() == 1


def test_it_skips_missed_slots_instead_of_firing_a_burst():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    _make_due(schedule, ago=timedelta(hours=3))
    assert len(schedules.schedules_fire()) == 1
    assert schedules.schedules_fire() == []
    schedule.refresh_from_db()
    assert schedule.next_run_at > _db_now()


def test_it_fires_each_due_schedule():
    first = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    second = schedules.schedule_create(
        task_id="u-sched-plain", cron="*/2 * * * *", payload={"name": "b"}, by=Actor.system("tests")
    )
    _make_due(first)
    _make_due(second, ago=timedelta(minutes=2))
    runs = schedules.schedules_fire()
    assert sorted(r.payload["name"] for r in runs) == ["a", "b"]


def test_a_disabled_schedule_does_not_fire():
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    schedules.schedule_update(schedule=schedule, enabled=False, by=Actor.system("tests"))
    Schedule.objects.filter(pk=schedule.pk).update(next_run_at=Now() - timedelta(minutes=1))
    assert schedules.schedules_fire() == []
    assert not Run.objects.filter(task_id="u-sched-plain").exists()


def test_a_schedule_whose_task_is_gone_records_why_and_moves_on(monkeypatch):
    schedule = schedules.schedule_create(
        task_id="u-sched-plain", cron="* * * * *", payload={"name": "a"}, by=Actor.system("tests")
    )
    _make_due(schedule)
    monkeypatch.delitem(registry._tasks, "u-sched-plain")
    assert schedules.schedules_fire() == []
    schedule.refresh_from_db()
    assert "no task named 'u-sched-plain'" in schedule.last_error
    assert schedule.next_run_at > _db_now()  # not retried every tick
    assert schedule.last_run is None


# --- sync from code ------------------------------------------------------------------------------------------


def test_sync_creates_a_code_schedule_once():
    first = schedules.schedules_sync_from_code()
    assert first.created >= 1
    schedule = Schedule.objects.get(task_id="u-sched-code")
    assert (schedule.source, schedule.cron, schedule.timezone, schedule.enabled) == ("code", "*/5 * * * *", "UTC", True)
    assert schedule.next_run_at.minute % 5 == 0
    again = schedules.schedules_sync_from_code()
    assert (again.created, again.updated, again.disabled) == (0, 0, 0)
    assert Schedule.objects.filter(task_id="u-sched-code").count() == 1


def test_sync_updates_a_changed_cron_and_disables_a_dropped_schedule(monkeypatch):
    schedules.schedules_sync_from_code()
    monkeypatch.setattr(code_scheduled, "schedule", "30 4 * * *")
    assert schedules.schedules_sync_from_code().updated == 1
    schedule = Schedule.objects.get(task_id="u-sched-code")
    assert schedule.cron == "30 4 * * *"
    assert (schedule.next_run_at.hour, schedule.next_run_at.minute) == (4, 30)

    monkeypatch.setattr(code_scheduled, "schedule", None)
    assert schedules.schedules_sync_from_code().disabled == 1
    schedule.refresh_from_db()
    assert (schedule.enabled, schedule.next_run_at) == (False, None)

    monkeypatch.setattr(code_scheduled, "schedule", "30 4 * * *")
    schedules.schedules_sync_from_code()
    schedule.refresh_from_db()
    assert schedule.enabled
    assert schedule.next_run_at is not None


def test_sync_skips_a_declared_schedule_that_does_not_validate(monkeypatch, caplog):
    monkeypatch.setattr(code_scheduled, "schedule", "every minute")
    schedules.schedules_sync_from_code()
    assert not Schedule.objects.filter(task_id="u-sched-code").exists()
    assert "u-sched-code: schedule='every minute' is not usable" in caplog.text


@pytest.mark.parametrize(
    "cron, payload, message",
    [
        ("* * * * 7-1", '{"name": "x"}', "the cron&#x27;s day-of-week field: the range 7-1 runs backwards"),
        ("0 0 30 2 *", '{"name": "x"}', "never matches a date"),
        ("* * * * *", '{"name": "x\\u0000"}', "name: text can&#x27;t contain NUL"),
    ],
)
def test_the_dashboard_form_shows_why_a_schedule_is_refused(operator, cron, payload, message):
    response = operator.post("/schedules/", {"task_id": "t-typed", "cron": cron, "timezone": "UTC", "payload": payload})
    assert response.status_code == 422
    assert message in response.content.decode()
    assert not Schedule.objects.exists()
