"""The throughput, resume, realtime, dashboard and parked benchmarks and the README report can't rot.

One `bench/run.py --tiny` process runs the five scenarios end to end at their smallest sizes (real worker,
scheduler and daphne processes, websocket clients, seeded databases) and writes every figure; the report renders
a README table and an SVG chart from results. Benchmarks are not tests, so nothing here looks at a time or a goal;
counts that are exact by construction (steps re-executed, queries per page) are checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import pytest

from bench import report, run

ROOT = Path(__file__).resolve().parent.parent.parent

FIGURES = {
    "throughput": [
        "steps_per_s_n100",
        "ratio_vs_dbos_n100",
        "ratio_vs_celery_chain_n100",
        "ratio_vs_celery_chain_defaults_n100",
        "run_p99_ms_n100",
    ],
    "resume": ["reexecuted_steps_exception", "reexecuted_steps_sigkill", "recovery_s_sigkill"],
    "realtime": ["ws_p50_ms", "ws_p99_ms_100_clients", "ws_p99_ms_1000_clients", "ratio_p50_vs_redis", "redis_p50_ms"],
    "dashboard": ["queries_per_page", "list_p95_ms_100k", "ratio_p95_100k_vs_1k"],
}
# Parked has goals of its own shape (counts and rates, no peer ratios): checked apart.
PARKED_FIGURES = [
    "worker_slots_held",
    "worker_rss_growth_mb",
    "idle_queries_per_s",
    "wake_steps_per_s",
    "wake_p99_s",
    "parked_per_s",
    "celery_eta_messages_held",
    "celery_eta_rss_growth_mb",
]


@pytest.mark.integration  # it starts real worker, scheduler and daphne processes
def test_the_five_scenarios_run_and_write_their_figures(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # Never the databases of a real bench run, nor those of the other bench smoke tests.
    env = {**os.environ, "DEX_BENCH_DATABASE": "dex_bench_smoke_scenarios"}
    only = [arg for name in [*FIGURES, "parked"] for arg in ("--only", name)]
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--tiny", *only, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    scenarios = json.loads(out.read_text())["scenarios"]
    for name, keys in FIGURES.items():
        result = scenarios[name]
        # Every goal has its figure, except those against a peer skipped at --tiny sizes (not measured: None).
        unmeasured = {key for key, met in result["goals_met"].items() if met is None}
        assert isinstance(result["met"], bool) and set(result["goal"]) - unmeasured <= set(result["figures"]), name
        assert all(key.startswith("ratio_vs_restate") for key in unmeasured), (name, unmeasured)
        for key in keys:
            value = result["figures"][key]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (name, key, value)
    # Exact by construction: no run is lost, the failed step and only it runs again, no message goes missing,
    # the pages stay within their query budget and never count a whole table.
    assert scenarios["throughput"]["figures"]["lost_runs"] == 0
    assert scenarios["resume"]["figures"]["reexecuted_steps_exception"] == 1
    assert scenarios["resume"]["figures"]["reexecuted_steps_sigkill"] == 1
    assert scenarios["resume"]["figures"]["committed_steps_reexecuted"] == 0
    assert scenarios["realtime"]["figures"]["lost_messages"] == 0
    assert scenarios["dashboard"]["figures"]["queries_per_page"] <= 8
    assert scenarios["dashboard"]["figures"]["unbounded_counts"] == 0
    parked = scenarios["parked"]
    assert set(parked["goal"]) == {"worker_slots_held", "worker_rss_growth_mb", "idle_queries_per_s"}
    assert isinstance(parked["met"], bool)
    for name in PARKED_FIGURES:
        value = parked["figures"][name]
        assert isinstance(value, int | float) and math.isfinite(value), (name, value)
    for name in ("idle_queries_per_s", "wake_steps_per_s", "wake_p99_s", "parked_per_s"):
        assert parked["figures"][name] > 0, (name, parked["figures"][name])
    # Counts, not timings: a parked run holds no worker slot; a Celery countdown task is held until due.
    assert parked["figures"]["worker_slots_held"] == 0
    assert parked["figures"]["parked_runs"] == 200 and parked["figures"]["celery_eta_messages_held"] > 0
    assert parked["idle_scheduler"]["idle_ticks"] >= 1
    # A tiny run is never written into the README, and the harness stopped every process it started.
    assert not (tmp_path / "throughput.json").exists()
    sessions = [line.rsplit("session ", 1)[1].strip() for line in done.stderr.splitlines() if "; session " in line]
    assert sessions, done.stderr[-3000:]
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"dex-bench-{sessions[0]}" not in listing


SAMPLE = {
    "machine": "box: 2 cores",
    "when": "2026-11-24T19:00:00+00:00",
    "sizes": "quick",
    "command": "bench/run.py --quick",
    "seconds": 412.0,
    "postgres": "Postgres 16.2 (fsync on, synchronous_commit on, wal_sync_method fdatasync)",
    "load_before": {"uptime": "19:00 up 1 day, load average: 1.50, 1.20, 1.00", "load": [1.5, 1.2, 1.0]},
    "load_after": {"uptime": "19:07 up 1 day, load average: 2.50, 2.20, 1.80", "load": [2.5, 2.2, 1.8]},
    "scenarios": {
        "step_overhead": {
            "figures": {
                "dex_ms_per_step": 1.5,
                "dbos_ms_per_step": 3.5,
                "ratio_vs_dbos": 0.43,
                "commit_floor_ms": 0.3,
                "pgbench_floor_tps": 5300.0,
                "celery_chain_ms_per_step": 2.4,
            },
            "goal": {"ratio_vs_dbos": "<= 0.5", "ratio_vs_restate": "<= 1.0"},
            "goals_met": {"ratio_vs_dbos": True, "ratio_vs_restate": None},
            "met": True,
            "ranges": {"dex_ms_per_step": [1.4, 1.7]},
            "skipped_peers": {
                "restate": "npm install failed: ECONNREFUSED",
                "temporal_activities": "uv pip install failed: no route",
            },
            "not_runnable_peers": {"hatchet": "downloads its engine at run time"},
            "sizes_name": "quick",
        },
        "throughput": {
            "figures": {"steps_per_s_n100": 512.3, "ratio_vs_dbos_n100": 2.4, "lost_runs": 0},
            "goal": {"ratio_vs_dbos_n100": ">= 2.0", "lost_runs": "== 0"},
            "goals_met": {"ratio_vs_dbos_n100": True, "lost_runs": True},
            "met": True,
            "ranges": {"ratio_vs_dbos_n100": [2.1, 2.7]},
            "sizes_name": "quick",
        },
        "realtime": {
            "figures": {"ws_p50_ms": 12.5, "ws_p99_ms_1000_clients": 1530.0, "lost_messages": 0},
            "goal": {"ws_p50_ms": "<= 5", "ws_p99_ms_1000_clients": "<= 250", "lost_messages": "== 0"},
            "goals_met": {"ws_p50_ms": False, "ws_p99_ms_1000_clients": False, "lost_messages": True},
            "met": False,
        },
        "resume": {
            "figures": {"recovery_s_sigkill": 2.3},
            "goal": {"recovery_s_sigkill": "<= 2"},
            "goals_met": {"recovery_s_sigkill": False},
            "met": False,
            "missed_because": "the lease runs out a tick before the scheduler sees it",
            "sizes_name": "quick",
        },
        "llm_savings": {  # a --tiny result (a smoke run) never reaches the README
            "figures": {"llm_calls_retry": 1},
            "goal": {"llm_calls_retry": "== 1"},
            "goals_met": {"llm_calls_retry": True},
            "met": True,
            "sizes_name": "tiny",
        },
    },
}
FAULTS = {
    "machine": "box: 2 cores",
    "when": "2026-11-25T08:00:00+00:00",
    "sizes": "full",
    "scenarios": {
        "faults": {
            "figures": {"reexecuted_committed_steps": 0, "stuck_runs": 0, "completed_fraction": 1.0},
            "goal": {"reexecuted_committed_steps": "== 0", "stuck_runs": "== 0"},
            "goals_met": {"reexecuted_committed_steps": True, "stuck_runs": True},
            "met": True,
            "detail": {"sigkill": {"runs": 10, "faults": 20, "completed": 10, "reexecuted_committed_steps": 0}},
        },
    },
}


def test_the_report_renders_one_runs_tables_between_the_markers_and_a_chart(tmp_path: Path) -> None:
    results = tmp_path / "readme.json"
    results.write_text(json.dumps(SAMPLE))
    # Another run's result beside it is never merged into the table (one run, one table).
    newer = {"scenario": "realtime", "result": {**SAMPLE["scenarios"]["realtime"], "figures": {"ws_p50_ms": 3.25}}}
    (tmp_path / "realtime.json").write_text(json.dumps(newer))
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps(FAULTS))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Dex\n\nintro\n\n{report.BENCH_BEGIN}\nold table\n{report.BENCH_END}\n\n## After\n")
    chart = tmp_path / "bench.svg"

    assert report.main([str(results), str(faults), "--readme", str(readme), "--svg", str(chart)]) == 0

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Dex\n\nintro\n") and text.rstrip().endswith("## After")
    table = text.split(report.BENCH_BEGIN)[1].split(report.BENCH_END)[0]
    assert "| steps/s at N=100 | 2.4× <sub>(2.1–2.7)</sub> | DBOS, same number of processes | ≥ 2.0 | ✔ |" in table
    assert "| commit → message p50, 1 client (ms) | 12.5 |  | ≤ 5 | ✘ 2.5× the bound |" in table
    assert "| p99 at 1,000 clients (ms) | 1,530 |  | ≤ 250 | ✘ 6.1× the bound |" in table
    assert "| SIGKILL → step 9 runs again (s) | 2.3 |  | ≤ 2 | ✘ by 15 % |" in table
    assert "3.25" not in table
    # A goal against a skipped peer is said to be unmeasured, and the skipped peers are named with the reason.
    assert "| time per step, end to end | – | Restate (WAL fsync on) | ≤ 1.0 | not measured |" in table
    assert "4 of 7 goals met** (1 not measured: their peer was skipped)" in table
    assert "restate (npm install failed: ECONNREFUSED)" in table
    assert "| Restate | skipped: npm install failed: ECONNREFUSED | – | – |" in table
    assert "| DBOS Transact | one DBOS process per Dex worker process | 3.5 | – |" in table
    assert "| Hatchet | can't run here: downloads its engine at run time | – | – |" in table
    # Beside the table: the run's load average, Postgres version, commit floor and command.
    assert "Load average (1/5/15 min, `uptime`): 1.50 / 1.20 / 1.00 before, 2.50 / 2.20 / 1.80 after." in table
    assert "Postgres 16.2 (fsync on, synchronous_commit on" in table
    assert "Commit floor: 0.3 ms (a prepared one-row INSERT in autocommit), pgbench -M prepared 5,300" in table
    assert "in one `bench/run.py --quick` run (quick sizes, 6.9 min)" in table
    assert "- `resume`: the lease runs out a tick before the scheduler sees it" in table
    assert "LLM calls" not in table
    assert "docs/bench.svg" in table
    faults_block = text.split(report.FAULTS_BEGIN)[1].split(report.FAULTS_END)[0]
    assert "| sigkill | 10 | 20 | 10 | 0 |" in faults_block and "| stuck runs | 0 | = 0 | ✔ |" in faults_block
    svg = xml.dom.minidom.parse(str(chart))
    labels = [t.firstChild.data for t in svg.getElementsByTagName("text") if t.firstChild]
    assert "throughput · ratio_vs_dbos_n100" in labels and "realtime · ws_p50_ms" in labels
    assert "step_overhead · ratio_vs_restate" not in labels

    # Rendering again changes nothing: the blocks are replaced, not appended.
    before = readme.read_text()
    report.main([str(results), str(faults), "--readme", str(readme), "--svg", str(chart)])
    assert readme.read_text() == before


def test_only_a_run_of_every_readme_scenario_becomes_the_readme_table(tmp_path: Path, monkeypatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Dex\n\n{report.BENCH_BEGIN}\nold table\n{report.BENCH_END}\n")
    monkeypatch.setattr(run, "README_RESULTS", tmp_path / "readme.json")
    monkeypatch.setattr(run, "FAULTS_RESULTS", tmp_path / "faults.json")
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "SVG", tmp_path / "bench.svg")
    monkeypatch.setattr(report.render, "__defaults__", (readme, tmp_path / "bench.svg"))
    out = tmp_path / "latest.json"

    # `--only throughput`: the README and readme.json are left alone.
    partial = {**SAMPLE, "scenarios": {"throughput": SAMPLE["scenarios"]["throughput"]}}
    out.write_text(json.dumps(partial))
    run._publish(out, partial)
    assert "old table" in readme.read_text() and not (tmp_path / "readme.json").exists()

    # A run of every README scenario: its own file becomes readme.json, and the table is rendered from it.
    whole = {**SAMPLE, "scenarios": dict.fromkeys(report.ORDER, SAMPLE["scenarios"]["throughput"])}
    out.write_text(json.dumps(whole))
    run._publish(out, whole)
    assert json.loads((tmp_path / "readme.json").read_text()) == whole
    assert "old table" not in readme.read_text() and (tmp_path / "bench.svg").exists()
