"""Run the Dex scheduler: the process that turns due rows into work.

Each tick is one statement (engine.scheduler_tick) that:
1. wakes waiting/delayed runs whose `wake_at` has passed (sleeps, retry back-off, wait timeouts);
2. re-queues running runs whose worker died — its Postgres session is gone (a killed process), or its lease
   expired (a lost machine) — at the broker's top priority, dead-lettering past DEX_MAX_RECOVERIES;
3. re-sends the wake-up of queued runs nobody claimed for DEX_REQUEUE_STALE_SECONDS (a lost message);
   and of rate-limited queued runs whose window opened (their `wake_at`, set by flow.claim_next);
then enqueues what it changed, after commit;
4. when the tick statement says a cron schedule is due, fires the due ones (schedules.schedules_fire): one
   run per slot, next_run_at moved to the next slot after now (missed slots are skipped).
An idle tick is therefore one indexed query.
5. every DEX_ALERT_SCAN_SECONDS, alerts.alerts_scan: alerts a lost settle hook missed, "stuck" waits, lost
   alert deliveries (three indexed queries).
6. every DEX_RETENTION_INTERVAL_SECONDS (unless DEX_RETENTION_DAYS=0), retention.ScheduledRetention: deletes
   finished runs older than DEX_RETENTION_DAYS, a few batches a tick while a backlog remains.
At start-up (and until it succeeds) it first syncs the schedules declared by `@task(schedule=...)`
(schedules.schedules_sync_from_code). Rows are taken with SKIP LOCKED, so several schedulers may run
at once and none double-enqueues or double-fires a slot. Time is Postgres's `now()`, never this machine's
clock. When a tick found work it ticks again at once; when idle it sleeps until the next due time the tick
reported, or until a run parking with a nearer one NOTIFYs the `dex_scheduler` channel — but at most
DEX_SCHEDULER_TICK_SECONDS, the bound on noticing a dead worker (one indexed statement a second when idle).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, connection
from django.utils import timezone

from runs import engine
from runs.engine.settle import SCHEDULER_CHANNEL
from runs.ops import alerts, retention, schedules

log = logging.getLogger("dex.scheduler")


class Command(BaseCommand):
    help = "Wake due runs, recover runs of dead workers, re-send lost wake-ups and fire cron schedules."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--once", action="store_true", help="Tick once and exit.")

    def handle(self, *args: Any, once: bool = False, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        interval = settings.DEX_SCHEDULER_TICK_SECONDS
        log.info("scheduler started (tick %.2fs, lease %.1fs)", interval, settings.DEX_LEASE_SECONDS)
        synced = False
        listener = _Listener()
        alerts_due = 0.0
        scheduled_retention = retention.ScheduledRetention()
        while not stop.is_set():
            try:
                if not synced:
                    sync = schedules.schedules_sync_from_code()
                    synced = True
                    log.info(
                        "code schedules: %d created, %d updated, %d disabled", sync.created, sync.updated, sync.disabled
                    )
                result = engine.scheduler_tick()
                fired = schedules.schedules_fire() if result.schedules_due else []
                if time.monotonic() >= alerts_due:
                    alerts_due = time.monotonic() + settings.DEX_ALERT_SCAN_SECONDS
                    try:
                        scan = alerts.alerts_scan()
                    except DatabaseError:
                        raise
                    except Exception:  # an alert bug must not stop runs from waking: it scans again later
                        log.exception("alert scan failed; trying again in %ss", settings.DEX_ALERT_SCAN_SECONDS)
                    else:
                        if scan.raised or scan.stuck or scan.resent:
                            log.info("alerts: raised %d, stuck %d, re-sent %d", scan.raised, scan.stuck, scan.resent)
                try:
                    scheduled_retention.tick()
                except DatabaseError:
                    raise
                except Exception:
                    # Retention must never stop the scheduler (a storage outage, say): it tries next interval.
                    log.exception("retention failed; trying again in %ss", settings.DEX_RETENTION_INTERVAL_SECONDS)
            except DatabaseError:
                log.warning("scheduler tick failed; retrying", exc_info=True)
                connection.close()
                listener.close()
                stop.wait(interval)
                continue
            if fired:
                log.info("fired %d schedule(s)", len(fired))
            if result.total:
                log.info(
                    "woke %d, recovered %d, dead-lettered %d, re-sent %d",
                    result.woken,
                    result.recovered,
                    result.dead,
                    result.resent,
                )
            if once:
                break
            if not result.total and not fired:
                wait = interval
                if result.next_due is not None:
                    wait = min(wait, max(0.0, (result.next_due - timezone.now()).total_seconds()))
                listener.wait(wait, stop)
        listener.close()
        log.info("scheduler stopped")


class _Listener:
    """LISTEN on the scheduler's channel: a run parking with a wake-up nearer than the scheduler's sleep says
    so, and the scheduler ticks at once. Without a connection (Postgres restarting) it only sleeps."""

    def __init__(self) -> None:
        self._conn: psycopg.Connection | None = None

    def wait(self, seconds: float, stop: threading.Event) -> None:
        if seconds <= 0:
            return
        if settings.DEX_DB_POOLER == "transaction":  # LISTEN needs a session of its own: only sleep
            stop.wait(seconds)
            return
        try:
            if self._conn is None:
                params = connection.get_connection_params()
                for django_only in ("cursor_factory", "context", "prepare_threshold"):
                    params.pop(django_only, None)
                self._conn = psycopg.connect(**params, autocommit=True)
                self._conn.execute(f"LISTEN {SCHEDULER_CHANNEL}")
            for _notice in self._conn.notifies(timeout=seconds, stop_after=1):
                break
        except psycopg.Error:
            self.close()
            stop.wait(seconds)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
