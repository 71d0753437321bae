"""Tasks that prove DESIGN §3's guarantees from outside (tests/integration/test_guarantees.py), run by real
worker processes (DEX_AGENT_MODULES). Every side effect goes to a ledger file outside Dex's database; a "gate"
file lets a test hold a run at the worst moment (mid-step, between steps) and SIGKILL its worker there."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from runs.sdk import Retry, task
from tests.agents import record

GATE_TIMEOUT = 120.0


def wait_for_gate(gate: str) -> None:
    """Block until the test opens the gate (creates the file); a test that never does fails the step."""
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody opened the gate {gate}")
        time.sleep(0.02)


def _note(ledger: str, line: str) -> str:
    record(ledger, line)
    return line


# --- pausing runs no agent code -----------------------------------------------------------------------------


def _fails_once(ledger: str, marker: str) -> str:
    if not os.path.exists(marker):
        Path(marker).touch()
        record(ledger, "flaky failed")
        raise ConnectionError("the first attempt fails")
    return "ok"


@task("g-finally", retry=Retry(attempts=3, initial=0.3, backoff=1.0, max_delay=0.3), budget_usd=0.000001)
def finally_after_pause(ctx, ledger: str, kind: str, key: str = "") -> str:
    """Pauses one way, then does its work; a step in `finally:` cleans up. The ledger must read work, cleanup."""
    try:
        if kind == "sleep":
            ctx.sleep("nap", 0.5)
        elif kind == "event":
            ctx.wait_for_event("hear", event="g.finally", match={"key": key})
        elif kind == "approval":
            ctx.wait_for_approval("ok?", prompt="go on?")
        elif kind == "invoke":
            ctx.invoke("child", "g-child", {"ledger": ledger})
        elif kind == "retry":
            ctx.step("flaky", _fails_once, ledger, ledger + ".marker")
        elif kind == "budget":
            ctx.ai.infer("ask", model="gpt-5-mini", messages=[{"role": "user", "content": "hello " * 400}])
        ctx.step("work", _note, ledger, "work")
    finally:
        ctx.step("cleanup", _note, ledger, "cleanup")
    return "done"


@task("g-child")
def child(ctx, ledger: str) -> str:
    return ctx.step("child-work", _note, ledger, "child")


# --- deadlines are recorded ---------------------------------------------------------------------------------


@task("g-sleep")
def sleeper(ctx, ledger: str, seconds: float) -> float:
    ctx.step("before", _note, ledger, "before")
    ctx.sleep("nap", seconds)
    return ctx.step("after", time.time)


@task("g-wait-timeout")
def wait_with_timeout(ctx, ledger: str, key: str, seconds: float) -> dict | None:
    ctx.step("before", _note, ledger, "before")
    return ctx.wait_for_event("hear", event="g.timeout", match={"key": key}, timeout=timedelta(seconds=seconds))


# --- no lost-event race -------------------------------------------------------------------------------------


@task("g-event-race")
def event_race(ctx, ledger: str, gate: str, key: str, lookback: float | None = None, timeout: float = 60) -> dict:
    """A slow step first (the test sends the event meanwhile), then the wait."""

    def slow() -> str:
        record(ledger, "slow started")
        wait_for_gate(gate)
        return "slow"

    ctx.step("slow", slow)
    first = ctx.wait_for_event(
        "first", event="g.race", match={"key": key}, timeout=timedelta(seconds=timeout), lookback=lookback
    )
    second = ctx.wait_for_event("second", event="g.race", match={"key": key}, timeout=timedelta(seconds=timeout))
    return {"first": first, "second": second}


# --- durable return; death detection; worker-lost attempts ---------------------------------------------------


@task("g-between")
def between_steps(ctx, ledger: str, gate: str) -> str:
    """Agent code between two steps blocks at a gate: the test SIGKILLs the worker there."""
    ctx.step("paid-call", _note, ledger, "paid-call")
    record(ledger, "between")  # agent code (not a step): runs again on the next execution, as it may
    wait_for_gate(gate)
    return ctx.step("next", _note, ledger, "next")


@task("g-long-step")
def long_step(ctx, ledger: str, gate: str) -> str:
    """A step that runs until the test opens the gate (SIGKILL lands mid-step)."""

    def long() -> str:
        record(ledger, f"long attempt {ctx.attempt}")
        wait_for_gate(gate)
        return "long"

    ctx.step("long", long)
    return ctx.step("after", _note, ledger, "after")


@task("g-quick")
def quick(ctx, ledger: str, n: int, pause: float = 0.3) -> int:
    def work() -> int:
        record(ledger, f"quick {n}")
        time.sleep(pause)
        return n

    return ctx.step("work", work)


# --- replay-aware logging -----------------------------------------------------------------------------------


@task("g-logs", retry=Retry(attempts=4, initial=0.05, backoff=1.0, max_delay=0.05))
def logs_outside_steps(ctx, ledger: str) -> str:
    ctx.log.info("starting the run")  # agent code outside steps: re-runs on each of the 3 executions

    def flaky() -> str:
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt} fails")
        return "ok"

    ctx.step("flaky", flaky)
    ctx.log.info("finished the run")
    return "ok"
