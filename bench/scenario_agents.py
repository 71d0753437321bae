"""Tasks of the `resume` and `realtime` benchmarks (loaded like bench/agents.py, via DEX_AGENT_MODULES, by the
bench process and the bench's workers).

Both keep an external record written outside the engine's transactions, so a figure never relies on what the
engine says about itself:
- `bench-resume` appends one line per step *execution* to a ledger file (O_APPEND, one write() per line), so a
  step that runs twice shows twice even if its first result was never committed;
- `bench-paced` is the realtime scenario's run: when DEX_BENCH_COMMIT_LEDGER is set, the worker notes the
  wall-clock time at which each step's completion was published, which the engine does right after the step's
  commit returned (runs.engine: `_fenced_write` then `realtime.publish_now`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from runs import realtime
from runs.sdk import Retry, task

RESUME_TASK_ID = "bench-resume"
PACED_TASK_ID = "bench-paced"
RESUME_STEPS = 10
FAIL_AT = 9  # 1-based: the ninth of the ten steps


def _ledger_append(path: str, line: str) -> None:
    # O_APPEND with a single write: concurrent writers (a dying worker and its successor) never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _ledger_count(path: str, run_id: str, step: int) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.startswith(f"{run_id}\t{step}\t"))
    except FileNotFoundError:
        return 0


def resume_step(ledger: str, run_id: str, i: int, mode: str) -> int:
    """One step of the resume run: record the execution, then (step FAIL_AT, first execution only) fail the
    way `mode` says: raise, or wait to be SIGKILLed by the bench (which watches the ledger)."""
    first = _ledger_count(ledger, run_id, i) == 0
    _ledger_append(ledger, f"{run_id}\t{i}\t{os.getpid()}\t{time.time():.6f}")
    if i == FAIL_AT and first:
        if mode == "exception":
            raise RuntimeError("bench: step 9 fails once")
        if mode == "sigkill":
            time.sleep(600)  # the bench kills the worker here; never returns in practice
            os.kill(os.getpid(), signal.SIGKILL)
    return i


@task(RESUME_TASK_ID, retry=Retry(attempts=1))
def bench_resume(ctx, ledger: str, mode: str = "exception") -> int:
    total = 0
    for i in range(1, RESUME_STEPS + 1):
        # The retried step waits 0.1 s before its second attempt (the scheduler wakes it at its next tick).
        retry = Retry(attempts=2, initial=0.1, jitter=0.0) if i == FAIL_AT else None
        total += ctx.step(f"s{i}", resume_step, ledger, ctx.run_id, i, mode, retry=retry)
    return total


def paced_step(i: int, pause: float) -> int:
    if pause:
        time.sleep(pause)
    return i


@task(PACED_TASK_ID, retry=Retry(attempts=1))
def bench_paced(ctx, steps: int = 10, pause: float = 0.02) -> int:
    """`steps` steps `pause` seconds apart, so each step's push is measured on its own, not queued behind
    the previous one's."""
    total = 0
    for i in range(steps):
        total += ctx.step(f"s{i}", paced_step, i, pause)
    return total


# --- the commit clock of the realtime scenario ------------------------------------------------------------------

_commit_ledger = os.environ.get("DEX_BENCH_COMMIT_LEDGER", "")
if _commit_ledger and not getattr(realtime, "_bench_commit_clock", False):
    _publish_now = realtime.publish_now

    def _publish_now_clocked(event: realtime.RunEvent, **kwargs: Any) -> None:
        # Read the clock first (the engine calls this right after the commit returned), publish, then note it:
        # the note's own cost stays out of the measured path.
        at = time.time()
        _publish_now(event, **kwargs)
        if event.kind == "step" and event.data.get("status") == "completed":
            _ledger_append(_commit_ledger, f"{event.run_id}\t{event.data.get('key')}\t{at:.6f}")

    realtime.publish_now = _publish_now_clocked
    realtime._bench_commit_clock = True  # type: ignore[attr-defined]
