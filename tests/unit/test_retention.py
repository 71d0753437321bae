"""Retention: `manage.py prune_runs` deletes old finished runs with everything that belongs to them, keeps the
rest, and the scheduler applies DEX_RETENTION_DAYS by itself."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from runs import offload
from runs.ids import uuid7_floor
from runs.models import AuditEntry, Event, LogLine, Run, RunStatus, Schedule, Step, StepChunk, StepStatus
from runs.ops import retention

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def outputs_dir(tmp_path: Path, settings) -> Path:
    location = tmp_path / "outputs"
    settings.STORAGES = {
        **settings.STORAGES,
        "dex_outputs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": location}},
    }
    settings.DEX_OUTPUT_INLINE_MAX_BYTES = 1024
    return location


def make_run(status: str = RunStatus.COMPLETED, *, age_days: float | None = 40, **fields) -> Run:
    finished = timezone.now() - timedelta(days=age_days) if age_days is not None else None
    return Run.objects.create(task_id=fields.pop("task_id", "t-old"), status=status, finished_at=finished, **fields)


def with_records(run: Run) -> Run:
    """A step (with an output big enough for the storage), a log line and a token chunk."""
    Step.objects.create(run=run, seq=0, key="big", status=StepStatus.COMPLETED, output="y" * 5000)
    LogLine.objects.create(run=run, step_key="big", ts=timezone.now(), message="hello")
    StepChunk.objects.create(run=run, step_key="big", seq=0, text="tok")
    return run


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune_runs", *args, stdout=out)
    return out.getvalue()


def test_it_deletes_only_old_finished_runs_with_their_steps_logs_chunks_and_stored_outputs(outputs_dir: Path):
    old_completed = with_records(make_run())
    old_failed = make_run(RunStatus.FAILED)
    recent = make_run(age_days=5)
    # Never pruned, however old: runs that aren't finished.
    active = [make_run(status, age_days=None) for status in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)]
    Run.objects.filter(pk__in=[r.pk for r in active]).update(created_at=timezone.now() - timedelta(days=90))
    waiting_parent = make_run(RunStatus.WAITING, age_days=None)
    child_of_waiting = make_run(parent=waiting_parent)  # its parent reads its outcome when it wakes
    child_of_old = make_run(age_days=1, parent=old_completed)
    fork_of_old = make_run(age_days=1, replay_of=old_failed)
    schedule = Schedule.objects.create(task_id="t-old", cron="* * * * *", last_run=old_completed)
    assert (outputs_dir / str(old_completed.pk)).is_dir()

    out = prune("--older-than", "30d")

    assert out.startswith("Deleted 2 runs, ") and out.rstrip().endswith("1 stored outputs in 1 batch(es).")
    assert {"1 steps", "1 log lines", "1 token chunks"} <= set(out.split(", "))
    left = set(Run.objects.values_list("pk", flat=True))
    assert old_completed.pk not in left and old_failed.pk not in left
    assert {recent.pk, waiting_parent.pk, child_of_waiting.pk, child_of_old.pk, fork_of_old.pk} <= left
    assert {r.pk for r in active} <= left
    assert not Step.objects.filter(run_id=old_completed.pk).exists()
    assert not LogLine.objects.filter(run_id=old_completed.pk).exists()
    assert not StepChunk.objects.filter(run_id=old_completed.pk).exists()
    assert not (outputs_dir / str(old_completed.pk)).exists()
    # Links to deleted runs are cleared, the rows that hold them kept.
    child_of_old.refresh_from_db()
    fork_of_old.refresh_from_db()
    schedule.refresh_from_db()
    assert child_of_old.parent_id is None and fork_of_old.replay_of_id is None and schedule.last_run_id is None
    entry = AuditEntry.objects.get(action="prune")
    assert entry.detail["runs"] == 2 and entry.username == ""


def test_status_and_task_filters_narrow_what_is_deleted():
    completed, failed, canceled = (make_run(s) for s in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED))
    other_task = make_run(RunStatus.FAILED, task_id="t-other")

    prune("--older-than", "30d", "--status", "failed", "--status", "canceled", "--task", "t-old")

    left = set(Run.objects.values_list("pk", flat=True))
    assert {completed.pk, other_task.pk} <= left
    assert not {failed.pk, canceled.pk} & left


def test_a_dry_run_counts_and_deletes_nothing():
    runs = [with_records(make_run()), make_run(RunStatus.TIMED_OUT), make_run(age_days=1)]

    out = prune("--older-than", "30d", "--dry-run")

    assert "Dry run: nothing deleted. Would delete 2 runs, 1 steps, 1 log lines." in out
    assert Run.objects.filter(pk__in=[r.pk for r in runs]).count() == 3
    assert not AuditEntry.objects.filter(action="prune").exists()


def test_it_works_in_batches():
    for _ in range(5):
        make_run()
    out = prune("--older-than", "12h", "--batch-size", "2")
    assert out.startswith("Deleted 5 runs") and "in 3 batch(es)" in out
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "30x"], "'30x' is not a duration: use a number and a unit, e.g. 30d"),
        (["--older-than", "thirty days"], "is not a duration"),
        (["--older-than", "0d"], "must be more than zero"),
        (["--older-than", "30d", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--older-than", "30d", "--status", "running"], "invalid choice: 'running'"),
    ],
)
def test_bad_arguments_are_a_clear_command_error_and_delete_nothing(args: list[str], message: str):
    run = make_run()
    with pytest.raises(CommandError, match=message):
        prune(*args)
    assert Run.objects.filter(pk=run.pk).exists()


def test_durations_in_every_unit():
    assert retention.parse_duration("30d") == timedelta(days=30)
    assert retention.parse_duration("12h") == timedelta(hours=12)
    assert retention.parse_duration("90m") == timedelta(minutes=90)
    assert retention.parse_duration("45s") == timedelta(seconds=45)
    assert retention.parse_duration("2w") == timedelta(weeks=2)
    assert retention.parse_duration("1.5d") == timedelta(hours=36)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_scheduler_applies_the_retention_setting_once_an_interval(settings):
    settings.DEX_RETENTION_DAYS = 30
    settings.DEX_RETENTION_INTERVAL_SECONDS = 3600
    clock = FakeClock()
    hook = retention.ScheduledRetention(clock=clock)
    old, recent = make_run(), make_run(age_days=10)

    assert hook.tick().runs == 1
    assert not Run.objects.filter(pk=old.pk).exists() and Run.objects.filter(pk=recent.pk).exists()

    later = make_run(age_days=31)
    clock.now += 60
    assert hook.tick() is None  # not due yet: an idle scheduler doesn't probe every tick
    assert Run.objects.filter(pk=later.pk).exists()
    clock.now += 3600
    assert hook.tick().runs == 1
    assert not Run.objects.filter(pk=later.pk).exists()
    assert AuditEntry.objects.filter(action="prune", detail__reason="DEX_RETENTION_DAYS=30").count() == 2


def test_a_backlog_is_worked_off_a_few_batches_a_tick(settings):
    settings.DEX_RETENTION_DAYS = 30
    hook = retention.ScheduledRetention(clock=FakeClock(), batch_size=1)
    for _ in range(retention.ScheduledRetention.MAX_BATCHES_PER_TICK + 1):
        make_run()
    first = hook.tick()
    assert first.runs == retention.ScheduledRetention.MAX_BATCHES_PER_TICK and first.more
    assert hook.tick().runs == 1  # due again at once, not an interval later
    assert not Run.objects.exists()


def test_retention_zero_keeps_runs_forever(settings):
    settings.DEX_RETENTION_DAYS = 0
    run = make_run(age_days=3650)
    assert retention.ScheduledRetention(clock=FakeClock()).tick() is None
    assert Run.objects.filter(pk=run.pk).exists()


def test_orphan_blobs_of_a_pruned_run_go_with_it(outputs_dir: Path):
    run = make_run()
    # A blob whose row never committed (the worker lost its lease after writing it).
    offload.offload_text('"' + "z" * 5000 + '"', run_id=run.pk)
    assert len(list((outputs_dir / str(run.pk)).iterdir())) == 1
    assert "1 stored outputs" in prune("--older-than", "30d")
    assert not (outputs_dir / str(run.pk)).exists()


def test_events_older_than_their_retention_are_pruned_and_newer_ones_kept():
    old = Event.objects.create(id=uuid7_floor(timezone.now() - timedelta(days=8)), name="old")
    new = Event.objects.create(name="new")
    assert retention.events_prune(older_than=timedelta(days=7)) == 1
    assert list(Event.objects.values_list("pk", flat=True)) == [new.pk]
    assert not Event.objects.filter(pk=old.pk).exists()
