"""Tasks with flow-control options, for tests/unit/test_flow_control.py and tests/integration/test_flow_control.py
(imported by the test process and, via DEX_AGENT_MODULES, by the test workers)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from runs.sdk import task
from tests.agents import record


def _hold(ledger: str, line: str, hold_file: str, pause: float) -> str:
    """Record `line`, then keep the worker busy until `hold_file` exists (if given) or for `pause` seconds."""
    record(ledger, line)
    deadline = time.monotonic() + 60
    if hold_file:
        while not Path(hold_file).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    elif pause:
        time.sleep(pause)
    return line


@task("t-flow-concurrency", concurrency=2)
def concurrency_two(ctx, ledger: str, n: int = 0, pause: float = 0.3, hold_file: str = "") -> int:
    ctx.step("work", _hold, ledger, f"start {n}", hold_file, pause)
    return n


@task("t-flow-per-user", concurrency=1, concurrency_key="user.id")
def one_per_user(ctx, ledger: str, user: dict, n: int = 0, hold_file: str = "") -> int:
    ctx.step("work", _hold, ledger, f"user {user.get('id')} run {n}", hold_file, 0.0)
    return n


@task("t-flow-rate", rate_limit=(5, timedelta(seconds=2)))
def rate_five_per_two_seconds(ctx, n: int = 0) -> int:
    return ctx.step("work", lambda: n)


@task("t-flow-rate-10s", rate_limit=(5, timedelta(seconds=10)), rate_key="tenant")
def rate_five_per_ten_seconds(ctx, tenant: str, n: int = 0) -> int:
    return ctx.step("work", lambda: n)


@task("t-flow-debounce", debounce=timedelta(seconds=2), debounce_key="user_id")
def debounced(ctx, user_id: int, text: str) -> str:
    return ctx.step("work", lambda: f"{user_id}: {text}")


@task("t-flow-priority", concurrency=1)
def one_at_a_time(ctx, ledger: str, name: str, hold_file: str = "") -> str:
    return ctx.step("work", _hold, ledger, name, hold_file, 0.0)


@task("t-flow-sleeper", concurrency=1)
def sleeper(ctx, ledger: str, n: int = 0) -> int:
    """Parks mid-run: a parked run holds no concurrency slot."""
    record(ledger, f"before sleep {n}")
    ctx.sleep("nap", timedelta(seconds=60))
    return n


AGENTS_QUEUE = "dex-test-flow-agents"


@task("t-flow-queued", queue=AGENTS_QUEUE, priority=3)
def on_its_own_queue(ctx) -> str:
    """Says which worker ran it (the test starts a worker for AGENTS_QUEUE only)."""
    import os

    return ctx.step("where", lambda: os.environ.get("DEX_TEST_WORKER_ROLE", ""))
