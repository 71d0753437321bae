"""What the benchmark's worker runs: a Dex task and Celery tasks doing the same no-op steps.

Loaded by the bench process and, through `DEX_AGENT_MODULES=bench.agents`, by the bench's own Celery worker
(on its own queue). Completion is signalled the same way for every worker-based variant: one pipelined
RPUSH to a Redis list the bench process BLPOPs — for Celery by the last task, for Dex after the
`dex.execute_run` task returns (the run is settled and committed by then).
"""

from __future__ import annotations

import os
from typing import Any

from celery import shared_task
from celery.signals import task_postrun

from runs.sdk import Retry, task

NOOP_TASK_ID = "bench-noop"
SLEEPER_TASK_ID = "bench-sleeper"
WAITER_TASK_ID = "bench-waiter"
WAKE_EVENT = "bench-parked-wake"
_redis: tuple[int, Any] | None = None


def noop(i: int) -> int:
    """The step: does nothing and returns a small JSON-serialisable value."""
    return i


def done_key(token: str) -> str:
    return f"dexbench:{os.environ.get('DEX_BENCH_SESSION', 'default')}:done:{token}"


def _client() -> Any:
    global _redis
    if _redis is None or _redis[0] != os.getpid():  # one client per process (prefork children)
        import redis
        from django.conf import settings

        _redis = (os.getpid(), redis.Redis.from_url(settings.REDIS_URL))
    return _redis[1]


def signal_done(token: str) -> None:
    key = done_key(token)
    pipe = _client().pipeline(transaction=False)
    pipe.rpush(key, "1")
    pipe.expire(key, 600)
    pipe.execute()


# --- Dex ----------------------------------------------------------------------------------------------------


@task(NOOP_TASK_ID, retry=Retry(attempts=1))
def bench_noop(ctx, steps: int = 10) -> int:
    total = 0
    for i in range(steps):
        total += ctx.step(f"s{i}", noop, i)
    return total


@task(SLEEPER_TASK_ID, retry=Retry(attempts=1))
def bench_sleeper(ctx, seconds: float = 60.0) -> int:
    """The `parked` scenario's sleeper: a step, a durable sleep of a fixed duration, a step."""
    ctx.step("before", noop, 0)
    ctx.sleep("nap", seconds)
    return ctx.step("after", noop, 1)


@task(WAITER_TASK_ID, retry=Retry(attempts=1))
def bench_waiter(ctx, key: str = "") -> int:
    """The `parked` scenario's waiter: a step, a wait for its own event (matched on `key`), a step."""
    ctx.step("before", noop, 0)
    ctx.wait_for_event("wake", event=WAKE_EVENT, match={"key": key})
    return ctx.step("after", noop, 1)


@task_postrun.connect
def _dex_run_returned(sender: Any = None, args: Any = None, **_: Any) -> None:
    if os.environ.get("DEX_BENCH_NO_DONE_SIGNAL"):  # the `parked` worker: 10,000s of runs, nobody BLPOPs
        return
    if getattr(sender, "name", "") == "dex.execute_run" and os.environ.get("DEX_BENCH_SESSION") and args:
        signal_done(f"dex:{args[0]}")


# --- Celery baselines ---------------------------------------------------------------------------------------


@shared_task(name="bench.noop_all", ignore_result=True)
def noop_all(token: str, steps: int) -> None:
    """Baseline: one Celery task doing every no-op step."""
    for i in range(steps):
        noop(i)
    signal_done(token)


@shared_task(name="bench.noop_link", ignore_result=True)
def noop_link(token: str, i: int, steps: int) -> None:
    """One link of a Celery chain: one no-op step; the last link signals completion."""
    noop(i)
    if i == steps - 1:
        signal_done(token)


@shared_task(name="bench.noop_link_defaults", ignore_result=True, acks_late=False, reject_on_worker_lost=False)
def noop_link_defaults(token: str, i: int, steps: int) -> None:
    """The same link for the Celery-defaults baseline: acknowledged on receipt (Celery's default, where Dex's
    settings acknowledge late), run by a worker started with Celery's default prefetch (4 per process)."""
    noop_link(token, i, steps)


@shared_task(name="bench.eta_noop", ignore_result=True)
def eta_noop(token: str) -> None:
    """The `parked` scenario's peer: a Celery task sent with `countdown=` (an ETA message the worker holds
    until due); counts itself done with one INCR the bench reads."""
    _client().incr(done_key(token))
