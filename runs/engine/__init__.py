"""The engine: claim a run under a lease, replay it with memoised steps, and move its state.

Every state change of a run is here, as a conditional UPDATE whose row count says whether it happened
(ENGINE.md). A worker's writes carry its lease token, so a worker that lost its lease (slow, partitioned,
resurrected) changes nothing. The happy path of a step is one statement: prove the lease, extend it, insert
the step's result (and any buffered log lines / metadata) — one commit per step.

The engine is pure of HTTP and sockets: it publishes through runs.realtime and enqueues through a callable.

Modules, by job:
    errors       control-flow signals (Parked, LeaseLost, ...) and how an exception is recorded
    codec        step/run outputs as JSON
    dispatch     where wake-ups go (the broker, or a test's sink)
    lease        the claim and the fenced statement behind every worker write
    context      `ctx` (RunContext); context_async its `async def` twin
    heartbeat    lease renewal, cancel and timeout notices for running runs
    execute      run_execute: claim, replay, settle
    settle       ending or parking a run (releasing the lease)
    transitions  wake, cancel, retry from outside a run
    flow         concurrency / rate limits / debounce at claim time
    scheduler    the scheduler's tick
"""

from __future__ import annotations

from runs.engine.codec import encode_output
from runs.engine.context import RunContext
from runs.engine.context_async import AsyncRunContext
from runs.engine.dispatch import enqueue_on_commit, enqueue_to
from runs.engine.errors import LeaseLost, Parked, RunTimedOut, StepFailedForGood, StepOutputError, error_info
from runs.engine.execute import run_execute
from runs.engine.lease import Buffer, Claim, fenced_write, run_claim, worker_name
from runs.engine.scheduler import TickResult, scheduler_tick
from runs.engine.settle import run_park, run_settle
from runs.engine.transitions import run_request_cancel, run_retry_from_failed_step, run_wake_now, runs_wake

__all__ = [
    "AsyncRunContext",
    "Buffer",
    "Claim",
    "LeaseLost",
    "Parked",
    "RunContext",
    "RunTimedOut",
    "StepFailedForGood",
    "StepOutputError",
    "TickResult",
    "encode_output",
    "enqueue_on_commit",
    "enqueue_to",
    "error_info",
    "fenced_write",
    "run_claim",
    "run_execute",
    "run_park",
    "run_request_cancel",
    "run_retry_from_failed_step",
    "run_settle",
    "run_wake_now",
    "runs_wake",
    "scheduler_tick",
    "worker_name",
]
