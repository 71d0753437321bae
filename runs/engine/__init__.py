"""The engine: claims a run under a lease, replays it with memoised steps, and moves its state (ENGINE.md).

Every state change of a run is a conditional UPDATE in this package. Modules, by job: errors, codec (outputs as
JSON), hooks (what the app plugs in), dispatch (wake-ups), lease (claim + fenced writes), context (`ctx`),
heartbeat, execute, settle (end or park), create, transitions (wake, cancel, retry), waits, flow, scheduler.
"""

from runs.engine.codec import encode_output
from runs.engine.context import RunContext, current_context, current_step_key
from runs.engine.context_async import AsyncRunContext
from runs.engine.create import run_create
from runs.engine.dispatch import enqueue_on_commit, enqueue_to
from runs.engine.errors import LeaseLost, Parked, RunTimedOut, StepFailedForGood, StepOutputError, error_info
from runs.engine.execute import run_execute
from runs.engine.lease import Buffer, Claim, fenced_write, run_claim, worker_name
from runs.engine.scheduler import TickResult, scheduler_tick
from runs.engine.settle import run_park, run_settle
from runs.engine.transitions import (
    run_cancel_tree,
    run_request_cancel,
    run_retry_from_failed_step,
    run_wake_now,
    runs_wake,
)
from runs.engine.waits import event_deliver, waitpoint_create, waitpoint_outcome, waitpoint_resolve

__all__ = [  # noqa: RUF022 — grouped by job, as above
    "AsyncRunContext", "Buffer", "Claim", "LeaseLost", "Parked", "RunContext", "RunTimedOut", "StepFailedForGood",
    "current_context", "current_step_key",
    "StepOutputError", "TickResult", "encode_output", "enqueue_on_commit", "enqueue_to", "error_info",
    "event_deliver", "fenced_write", "run_cancel_tree", "run_claim", "run_create", "run_execute", "run_park",
    "run_request_cancel", "run_retry_from_failed_step", "run_settle", "run_wake_now", "runs_wake", "scheduler_tick",
    "waitpoint_create", "waitpoint_outcome", "waitpoint_resolve", "worker_name",
]  # fmt: skip
