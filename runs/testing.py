"""Testing agents: execute a run in-process against the test database, skipping its timers.

    from runs.testing import run_task

    def test_research_agent(db):
        run = run_task(research_agent, {"topic": "durable execution"})
        assert run.status == "completed"
        assert [s.key for s in run.steps.all()] == ["plan", "search", ...]

The agent author's equivalent of Temporal's time-skipping test environment: retry back-off and sleeps
return at once; nothing goes through Celery or needs a worker.

With `cassette="tests/cassettes/x.json"` (written by `manage.py dex cassette export RUN_ID -o ...`), every LLM
call of the run, `ctx.ai.infer` and the framework integrations alike, is answered from the cassette in
order, with no provider called; a request the cassette doesn't hold fails the run and `run_task` raises
`CassetteMismatch` with the diff. `record="new"` appends what the cassette lacks, through the configured
provider; `record="all"` re-records it (runs.ai.cassettes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runs import engine
from runs.ai.cassettes import CassetteMismatch, Player, RecordMode, playing
from runs.models import TERMINAL_STATUSES, Run, RunStatus
from runs.sdk import Task
from runs.sdk.registry import registry


class RunDidNotFinish(AssertionError):
    pass


__all__ = ["CassetteMismatch", "RunDidNotFinish", "drive", "run_task"]


def run_task(
    task: Task | str,
    payload: dict | None = None,
    *,
    cassette: str | Path | None = None,
    record: RecordMode = "none",
    max_executions: int = 1000,
    **options: Any,
) -> Run:
    """Create a run of `task` (as a trigger would: `options` are run_create's, e.g. `tags=`) and execute it in
    this process until it finishes; return the run.

    `cassette`: answer the run's LLM calls from this file (see the module docstring); raises
    `CassetteMismatch` (an AssertionError, with the diff) if the run asked for something it doesn't hold."""
    task = registry.get(task) if isinstance(task, str) else task
    with engine.enqueue_to(lambda run_id: None):
        run, _ = engine.run_create(task=task, payload=task.validate_payload(payload), **options)
    if cassette is None:
        return drive(run, max_executions=max_executions)
    player = Player(cassette, record=record)
    with playing(player):
        run = drive(run, max_executions=max_executions)
    player.save_if_recorded()
    if player.mismatch is not None:
        raise CassetteMismatch(f"run {run.id} ended {run.status}: {player.mismatch}")
    return run


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
