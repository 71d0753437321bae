"""The client side of a peer in the bench (runs in the peers' own venv): starts workflows when told to, over
stdin/stdout, one JSON object a line, so the bench can alternate it with Dex's variants round by round.

    python driver.py restate INGRESS_URL
    python driver.py temporal ADDRESS TASK_QUEUE WORKFLOW      # WORKFLOW: NoopActivities or NoopLocal

Each request `{"n": N, "steps": S}` starts N workflows of S no-op steps at once and answers, when the last one
returned, `{"latencies_ms": [...], "failed": F, "errors": [...]}` (a latency per workflow that returned the
right total, from the request's arrival). The first line written is `{"ready": true}`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

TIMEOUT = 120.0


async def restate_starter(ingress: str) -> Callable[[int], Awaitable[int]]:
    import httpx

    client = httpx.AsyncClient(base_url=ingress, timeout=TIMEOUT, limits=httpx.Limits(max_connections=1000))

    async def start(steps: int) -> int:
        response = await client.post("/DexBenchNoop/run", json=steps)
        response.raise_for_status()
        return int(response.json())

    return start


async def temporal_starter(address: str, task_queue: str, workflow: str) -> Callable[[int], Awaitable[int]]:
    from temporalio.client import Client

    client = await Client.connect(address)

    async def start(steps: int) -> int:
        return await client.execute_workflow(
            workflow, steps, id=f"dexbench-{uuid.uuid4().hex}", task_queue=task_queue, result_type=int
        )

    return start


async def main(argv: list[str]) -> None:
    if argv[:1] == ["restate"] and len(argv) == 2:
        start = await restate_starter(argv[1])
    elif argv[:1] == ["temporal"] and len(argv) == 4:
        start = await temporal_starter(*argv[1:])
    else:
        raise SystemExit(__doc__)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        request = json.loads(line)
        answer = await one_round(start, int(request["n"]), int(request["steps"]))
        print(json.dumps(answer), flush=True)


async def one_round(start: Callable[[int], Awaitable[int]], n: int, steps: int) -> dict:
    """Start n workflows at once; each one's latency from now, and why those that failed did."""
    t0 = time.perf_counter()
    latencies: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        try:
            total = await asyncio.wait_for(start(steps), TIMEOUT)
        except Exception as exc:  # a failed workflow is counted, not a crash of the driver
            errors.append(repr(exc)[:300])
            return
        if total == sum(range(steps)):
            latencies.append((time.perf_counter() - t0) * 1000)
        else:
            errors.append(f"wrong total {total}")

    await asyncio.gather(*(one() for _ in range(n)))
    return {"latencies_ms": latencies, "failed": len(errors), "errors": errors[:5]}


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
