"""Testing agents: execute a run in-process against the test database, skipping its timers.

    from runs.testing import run_task

    def test_research_agent(db):
        run = run_task(research_agent, {"topic": "durable execution"})
        assert run.status == "completed"
        assert [s.key for s in run.steps.all()] == ["plan", "search", ...]

The agent author's equivalent of Temporal's time-skipping test environment: retry back-off and sleeps
return at once; nothing goes through Celery or needs a worker.
"""

from __future__ import annotations

from typing import Any

from runs import engine
from runs.models import TERMINAL_STATUSES, Run, RunStatus
from runs.sdk import Task
from runs.sdk.registry import registry


class RunDidNotFinish(AssertionError):
    pass


def run_task(task: Task | str, payload: dict | None = None, *, max_executions: int = 1000, **options: Any) -> Run:
    """Create a run of `task` (as a trigger would: `options` are run_create's, e.g. `tags=`) and execute it in
    this process until it finishes; return the run."""
    task = registry.get(task) if isinstance(task, str) else task
    with engine.enqueue_to(lambda run_id: None):
        run, _ = engine.run_create(task=task, payload=task.validate_payload(payload), **options)
    return drive(run, max_executions=max_executions)


def drive(run: Run, *, max_executions: int = 1000) -> Run:
    """Execute `run` in-process until it finishes: timers fire at once, child runs are driven in turn."""
    with engine.enqueue_to(lambda run_id: None):
        for _ in range(max_executions):
            run.refresh_from_db()
            if run.is_terminal:
                return run
            if run.status in (RunStatus.WAITING, RunStatus.DELAYED):
                children = run.children.exclude(status__in=TERMINAL_STATUSES)
                if children:
                    for child in children:  # each child's end wakes its parent
                        drive(child, max_executions=max_executions)
                    continue
                if run.wake_at is None:
                    raise RunDidNotFinish(f"run {run.id} waits with no timer (for an event or a person)")
                engine.run_wake_now(run.id)
            engine.run_execute(run.id, worker="dex-testing", heartbeat=False)
    raise RunDidNotFinish(f"run {run.id} did not finish in {max_executions} executions")
