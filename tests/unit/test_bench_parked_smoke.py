"""The `parked` benchmark can't rot: `bench/run.py --tiny --only parked` (200 runs) runs end to end and writes
every figure. Benchmarks are not tests, so nothing here looks at a time or a goal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.integration  # it starts a real Celery worker and a scheduler process

FIGURES = [
    "worker_slots_held",
    "worker_rss_growth_mb",
    "idle_queries_per_s",
    "wake_steps_per_s",
    "wake_p99_s",
    "parked_per_s",
    "celery_eta_messages_held",
    "celery_eta_rss_growth_mb",
]


def test_parked_runs_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # Never the databases of a real bench run, nor those of the step_overhead smoke test.
    env = {**os.environ, "DEX_BENCH_DATABASE": "dex_bench_smoke_parked"}
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--tiny", "--only", "parked", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    scenario = json.loads(out.read_text())["scenarios"]["parked"]
    assert set(scenario["goal"]) == {"worker_slots_held", "worker_rss_growth_mb", "idle_queries_per_s"}
    assert isinstance(scenario["met"], bool)
    figures = scenario["figures"]
    for name in FIGURES:
        value = figures[name]
        assert isinstance(value, int | float) and math.isfinite(value), (name, value)
    for name in ("idle_queries_per_s", "wake_steps_per_s", "wake_p99_s", "parked_per_s"):
        assert figures[name] > 0, (name, figures[name])
    # Counts, not timings: a parked run holds no worker slot; a Celery countdown task is held until due.
    assert figures["worker_slots_held"] == 0
    assert figures["parked_runs"] == 200 and figures["celery_eta_messages_held"] > 0
    assert scenario["idle_scheduler"]["idle_ticks"] >= 1
    # The harness stopped the workers and the scheduler it started (the queue and the scheduler's work dir
    # are named after the session).
    sessions = [line.rsplit("session ", 1)[1].strip() for line in done.stderr.splitlines() if "; session " in line]
    assert sessions, done.stderr[-3000:]
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"dex-bench-{sessions[0]}" not in listing
