"""Temporal's side of the comparison (runs in the peers' own venv, bench/.peers/venv): a workflow of the same
no-op steps as Dex's bench task, each an activity (`NoopActivities`) or a local activity (`NoopLocal`).

    python temporal_app.py worker ADDRESS TASK_QUEUE     # one worker process (the bench starts K of them)
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

STEP_TIMEOUT = timedelta(seconds=60)
NO_RETRY = RetryPolicy(maximum_attempts=1)


@activity.defn
async def noop(i: int) -> int:
    return i


@workflow.defn
class NoopActivities:
    @workflow.run
    async def run(self, steps: int) -> int:
        total = 0
        for i in range(steps):
            total += await workflow.execute_activity(
                noop, i, start_to_close_timeout=STEP_TIMEOUT, retry_policy=NO_RETRY
            )
        return total


@workflow.defn
class NoopLocal:
    @workflow.run
    async def run(self, steps: int) -> int:
        total = 0
        for i in range(steps):
            total += await workflow.execute_local_activity(
                noop, i, start_to_close_timeout=STEP_TIMEOUT, retry_policy=NO_RETRY
            )
        return total


async def serve(address: str, task_queue: str) -> None:
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    worker = Worker(client, task_queue=task_queue, workflows=[NoopActivities, NoopLocal], activities=[noop])
    print("worker ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        raise SystemExit(__doc__)
    asyncio.run(serve(sys.argv[2], sys.argv[3]))
