"""The benchmark harness can't rot: `bench/run.py --quick --only step_overhead` at tiny sizes runs end to end
and writes every figure. Benchmarks are not tests, so nothing here looks at a time or a goal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.integration  # it starts a real Celery worker process

FIGURES = [
    "dex_ms_per_step",
    "ratio_vs_celery_chain",
    "ratio_vs_dbos",
    "ratio_vs_commit_floor",
    "write_commits_per_step",
    "fraction_of_pgbench_floor",
    "dex_inprocess_ms_per_step",
    "write_commits_per_step_marginal",
    "ratio_vs_celery_chain_defaults",
    "dbos_ms_per_step",
    "cpu_ms_per_step",
    "pgbench_floor_tps",
]


def test_step_overhead_runs_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    env = {**os.environ, "DEX_BENCH_DATABASE": "dex_bench_smoke"}  # never the databases of a real bench run
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--tiny", "--only", "step_overhead", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    document = json.loads(out.read_text())
    assert document["machine"] and document["when"]
    scenario = document["scenarios"]["step_overhead"]
    assert set(scenario["goal"]) == {
        "ratio_vs_dbos",
        "ratio_inprocess_vs_dbos",
        "ratio_vs_restate",
        "ratio_vs_celery_chain",
        "ratio_inprocess_vs_commit_floor",
        "write_commits_per_step",
        "write_commits_per_step_marginal",
        "cpu_ms_per_step",
    }
    assert isinstance(scenario["met"], bool)
    # The peers are never installed by a test: at --tiny sizes they are skipped, and the result says why; the
    # goal against Restate is then not measured (None), not failed.
    assert set(scenario["skipped_peers"]) == {"restate", "temporal_activities", "temporal_local", "temporal_tuned"}
    assert all("--tiny" in why for why in scenario["skipped_peers"].values())
    assert scenario["goals_met"]["ratio_vs_restate"] is None and "ratio_vs_restate" not in scenario["figures"]
    assert set(scenario["not_runnable_peers"]) == {"hatchet", "inngest"}
    # Counted end to end, a 10-step run's write commits include the trigger's, the claim's and the settle's.
    assert scenario["figures"]["write_commits_per_step"] > scenario["figures"]["write_commits_per_step_marginal"]
    # Commits are read from the embedded server's WAL: one COMMIT record per write transaction, never more than
    # the transaction ids the round used (which count savepoints' subtransactions too).
    assert scenario["write_commits_counted_from"].startswith("WAL")
    figures = scenario["figures"]
    assert 0 < figures["dex_write_commits_per_run_min"] <= figures["dex_xids_per_run_min"]
    for name in FIGURES:
        value = scenario["figures"][name]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (name, value)
    for name in ("ratio_vs_celery_chain", "ratio_vs_dbos", "ratio_inprocess_vs_commit_floor"):
        low, high = scenario["ranges"][name]
        assert low <= scenario["figures"][name] <= high
    # The harness stopped the worker it started (its queue is named after the session).
    queue = _queue(done.stderr)
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert queue not in listing


def _queue(stderr: str) -> str:
    sessions = [line.rsplit("session ", 1)[1].strip() for line in stderr.splitlines() if "; session " in line]
    assert sessions, stderr[-3000:]
    return f"dex-bench-{sessions[0]}"


def test_llm_savings_runs_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    env = {**os.environ, "DEX_BENCH_DATABASE": "dex_bench_smoke_llm"}
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--tiny", "--only", "llm_savings", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    figures = json.loads(out.read_text())["scenarios"]["llm_savings"]["figures"]
    for name in ("llm_calls_first", "llm_calls_retry", "naive_calls_retry", "cost_saved_fraction"):
        assert isinstance(figures[name], int | float) and figures[name] >= 0, (name, figures[name])
