"""`manage.py scheduler` tells its operator the truth in its log: a tick that lost Postgres is retried, and
"scheduler stopped" is said once, when it really stops (it used to be said at every lost connection, while the
scheduler went on)."""

from __future__ import annotations

import logging
import signal

import pytest
from django.core.management import call_command
from django.db import OperationalError

from runs import engine


@pytest.mark.django_db(transaction=True)  # the command closes its connection after a failed tick
def test_a_tick_that_loses_postgres_is_retried_and_the_scheduler_says_stopped_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, settings
) -> None:
    settings.DEX_SCHEDULER_TICK_SECONDS = 0.01
    real_tick = engine.scheduler_tick
    ticks: list[int] = []

    def tick_after_a_restart():
        ticks.append(1)
        if len(ticks) == 1:
            raise OperationalError("terminating connection due to administrator command")
        return real_tick()

    monkeypatch.setattr(engine, "scheduler_tick", tick_after_a_restart)
    # The command installs SIGINT/SIGTERM handlers of its own: put pytest's back afterwards.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level(logging.INFO, logger="dex.scheduler"):
            call_command("scheduler", "--once")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    said = [record.getMessage() for record in caplog.records if record.name == "dex.scheduler"]
    assert len(ticks) == 2
    assert "scheduler tick failed; retrying" in said
    assert said.count("scheduler stopped") == 1 and said[-1] == "scheduler stopped", said
