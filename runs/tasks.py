"""Celery's interface to the engine: a message says "look at run X"; the engine does the rest.

`connect()` (called by RunsConfig.ready) plugs Celery in as the engine's dispatcher and the alerts' sender.
"""

from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from runs import engine
from runs.engine import flow, hooks
from runs.ops import alerts


@shared_task(name="dex.execute_run", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def execute_run(run_id: str) -> None:
    # The worker keeps its connection between runs (see dexweb/celery.py); drop it if it broke (Postgres
    # restarted) or aged out, as Django does at the start of a request.
    close_old_connections()
    engine.run_execute(run_id)


@shared_task(name="dex.deliver_alert", acks_late=True, ignore_result=True)
def deliver_alert(delivery_id: int) -> None:
    """One attempt at an alert delivery (runs.ops.alerts). A failed attempt's back-off is the delivery row's
    next_attempt_at: the scheduler's alert scan sends it again when due (no ETA message held by a worker)."""
    close_old_connections()
    alerts.delivery_send(delivery_id)


def dispatch_run(run_id: str, queue: str, priority: int) -> None:
    execute_run.apply_async(args=[run_id], queue=queue, priority=flow.broker_priority(priority))


def dispatch_delivery(delivery_id: int, queue: str) -> None:
    deliver_alert.apply_async((delivery_id,), queue=queue)


def connect() -> None:
    hooks.set_dispatcher(dispatch_run)
    alerts.set_delivery_dispatcher(dispatch_delivery)
