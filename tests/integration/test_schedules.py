"""Cron schedules with two real schedulers racing and a real worker: every slot fires exactly once."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from runs.models import Run, RunStatus, Schedule, ScheduleSource
from runs.ops import schedules
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import wait_for
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SLOTS = 4
SCHEDULES = 3


def test_two_schedulers_fire_each_slot_exactly_once(processes, tmp_path):
    processes.worker(concurrency=2)
    schedulers = [processes.scheduler(name="scheduler-a"), processes.scheduler(name="scheduler-b")]
    started = schedules._db_now()
    every_minute = [
        schedules.schedule_create(
            task_id="t-ten-steps",
            cron="* * * * *",
            payload={"ledger": str(tmp_path / f"ledger{i}.txt"), "steps": 1},
            by=Actor.system("tests"),
        )
        for i in range(SCHEDULES)
    ]
    ids = [s.id for s in every_minute]
    base = (started - timedelta(minutes=SLOTS + 1)).replace(second=0, microsecond=0)

    fired: dict[int, list] = {sid: [] for sid in ids}
    for n in range(SLOTS):
        # Simulate the next minute's slot coming due for every schedule at once; both schedulers race for it.
        slot = base + timedelta(minutes=n)
        Schedule.objects.filter(pk__in=ids).update(next_run_at=slot)
        for sid in ids:
            key = f"schedule:{sid}:{slot.isoformat()}"
            run = wait_for(lambda key=key: Run.objects.filter(idempotency_key=key).first(), what=f"the run of {key}")
            fired[sid].append(run)
        # Each schedule moved on to a real slot in the future (so no scheduler can fire this one again).
        wait_for(
            lambda slot=slot: not Schedule.objects.filter(pk__in=ids, next_run_at__lte=slot).exists(),
            what="the schedules to advance",
        )

    for sid, runs in fired.items():
        for run in runs:
            finished(run)
            assert run.status == RunStatus.COMPLETED, run.error
            assert run.tags == ["schedule"]
        # Exactly one run per simulated slot, and one execution each (a real minute passing during the test
        # may legitimately add a run for a slot after `started`).
        keys = list(
            Run.objects.filter(idempotency_key__startswith=f"schedule:{sid}:").values_list("idempotency_key", flat=True)
        )
        simulated = [k for k in keys if _slot_of(k) < started]
        assert len(simulated) == SLOTS
        assert len(set(simulated)) == SLOTS
        schedule = Schedule.objects.get(pk=sid)
        assert ledger_lines(schedule.payload["ledger"]).count("s1") == len(keys)
        assert schedule.next_run_at > started
        assert schedule.last_run_id is not None

    logs = "".join(s.log() for s in schedulers)
    # No scheduler ever got a slot the other had already fired (the idempotency key would have hidden it).
    assert "had already fired" not in logs
    fires = [line for line in logs.splitlines() if "fired slot" in line and "t-ten-steps" in line]
    assert len([line for line in fires if _slot_in_line(line) < started]) == SLOTS * SCHEDULES
    # Both schedulers synced the code schedule of t-cron at start, into one row.
    assert Schedule.objects.filter(task_id="t-cron", source=ScheduleSource.CODE, enabled=True).count() == 1


def _slot_of(key: str) -> datetime:
    # "schedule:<id>:<slot in ISO 8601>"
    return datetime.fromisoformat(key.split(":", 2)[2])


def _slot_in_line(line: str) -> datetime:
    # "... fired slot 2026-11-24T16:37:00+00:00: run <id>"
    rest = line.split("fired slot ", 1)[1]
    return datetime.fromisoformat(rest[: rest.index(": run ")])
