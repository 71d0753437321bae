"""Example agents that run with no external service: they exercise steps, retries, logs and metadata."""

from __future__ import annotations

import hashlib
import random
import time
from typing import Annotated

from pydantic import Field

from runs.sdk import NonRetriableError, Retry, task


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@task("hello-steps", retry=Retry(attempts=3, initial=0.5))
def hello_steps(
    ctx,
    # Bounded, so `steps=10**29` is a 422 at the door rather than a run holding a worker until someone notices.
    name: Annotated[str, Field(min_length=1, max_length=100, examples=["world"])] = "world",
    steps: Annotated[int, Field(ge=1, le=100, description="How many greetings.")] = 5,
    delay: Annotated[float, Field(ge=0, le=10, description="Seconds between greetings.")] = 0.3,
) -> dict:
    """Greets `name` in `steps` steps, one every `delay` seconds, reporting progress as metadata."""
    greetings = []
    for i in range(steps):
        greeting = ctx.step("greet", _greet, name, i, delay)
        greetings.append(greeting)
        ctx.set_metadata("progress", {"done": i + 1, "of": steps})
    digest = ctx.step("digest", _fingerprint, " ".join(greetings))
    return {"greetings": greetings, "digest": digest}


def _greet(name: str, i: int, delay: float) -> str:
    time.sleep(delay)
    import logging

    logging.getLogger("agents.examples").info("greeting %s (#%d)", name, i)
    return f"hello {name} #{i}"


@task("flaky-pipeline", retry=Retry(attempts=4, initial=0.5, backoff=2.0))
def flaky_pipeline(
    ctx,
    records: Annotated[int, Field(ge=1, le=10_000)] = 20,
    failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.5,
    seed: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = 7,
) -> dict:
    """Fetches, transforms and stores `records` items; the transform fails at random, and only the failed
    step is retried (watch its attempts in the run page). A failure rate of 1 fails the run for good."""
    if not 0 <= failure_rate <= 1:
        raise NonRetriableError("failure_rate must be between 0 and 1")
    rows = ctx.step("fetch", lambda: [{"id": i, "value": i * i} for i in range(records)])
    ctx.log.info("fetched %d records", len(rows))

    def transform() -> list[dict]:
        rng = random.Random(f"{seed}:{ctx.run_id}:{ctx.attempt}")
        if rng.random() < failure_rate:
            raise ConnectionError(f"upstream transform service unavailable (attempt {ctx.attempt})")
        return [{**row, "squared_root": row["value"] ** 0.5} for row in rows]

    transformed = ctx.step("transform", transform)
    total = ctx.step("store", lambda: sum(r["value"] for r in transformed))
    return {"records": len(transformed), "total": total}
