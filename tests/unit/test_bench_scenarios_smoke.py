"""The throughput, resume, realtime and dashboard benchmarks and the README report can't rot.

One `bench/run.py --tiny` process runs the four scenarios end to end at their smallest sizes (real worker,
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

from bench import report

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


@pytest.mark.integration  # it starts real worker, scheduler and daphne processes
def test_the_four_scenarios_run_and_write_their_figures(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # Never the databases of a real bench run, nor those of the other bench smoke tests.
    env = {**os.environ, "DEX_BENCH_DATABASE": "dex_bench_smoke_scenarios"}
    only = [arg for name in FIGURES for arg in ("--only", name)]
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--tiny", *only, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
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
    "scenarios": {
        "throughput": {
            "figures": {"steps_per_s_n100": 512.3, "ratio_vs_dbos_n100": 2.4, "lost_runs": 0},
            "goal": {"ratio_vs_dbos_n100": ">= 2.0", "lost_runs": "== 0"},
            "goals_met": {"ratio_vs_dbos_n100": True, "lost_runs": True},
            "met": True,
            "ranges": {"ratio_vs_dbos_n100": [2.1, 2.7]},
            "when": "2026-11-24T19:00:00+00:00",
            "sizes_name": "quick",
        },
        "realtime": {
            "figures": {"ws_p50_ms": 12.5, "lost_messages": 0},
            "goal": {"ws_p50_ms": "<= 5", "lost_messages": "== 0"},
            "goals_met": {"ws_p50_ms": False, "lost_messages": True},
            "met": False,
            "when": "2026-11-24T19:01:00+00:00",
        },
        "resume": {
            "figures": {"recovery_s_sigkill": 16.2},
            "goal": {"recovery_s_sigkill": "<= 15"},
            "goals_met": {"recovery_s_sigkill": False},
            "met": False,
            "missed_because": "the lease runs out a tick before the scheduler sees it",
            "when": "2026-11-24T19:01:30+00:00",
            "sizes_name": "quick",
        },
        "llm_savings": {  # a --tiny result (a smoke run) never reaches the README
            "figures": {"llm_calls_retry": 1},
            "goal": {"llm_calls_retry": "== 1"},
            "goals_met": {"llm_calls_retry": True},
            "met": True,
            "sizes_name": "tiny",
        },
        "faults": {
            "figures": {"reexecuted_committed_steps": 0, "stuck_runs": 0, "completed_fraction": 1.0},
            "goal": {"reexecuted_committed_steps": "== 0", "stuck_runs": "== 0"},
            "goals_met": {"reexecuted_committed_steps": True, "stuck_runs": True},
            "met": True,
            "detail": {"sigkill": {"runs": 10, "faults": 20, "completed": 10, "reexecuted_committed_steps": 0}},
            "when": "2026-11-24T19:02:00+00:00",
        },
    },
}


def test_the_report_renders_tables_between_the_markers_and_a_chart(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(SAMPLE))
    # A newer result of one scenario from a later `--only` run, kept beside the main file, wins.
    newer = {**SAMPLE["scenarios"]["realtime"], "figures": {"ws_p50_ms": 3.25, "lost_messages": 0}}
    newer.update(goals_met={"ws_p50_ms": True, "lost_messages": True}, when="2026-11-25T08:00:00+00:00")
    (tmp_path / "realtime.json").write_text(json.dumps({"scenario": "realtime", "result": newer}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Dex\n\nintro\n\n{report.BENCH_BEGIN}\nold table\n{report.BENCH_END}\n\n## After\n")
    chart = tmp_path / "bench.svg"

    assert report.main([str(results), "--readme", str(readme), "--svg", str(chart)]) == 0

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Dex\n\nintro\n") and text.rstrip().endswith("## After")
    table = text.split(report.BENCH_BEGIN)[1].split(report.BENCH_END)[0]
    assert "| steps/s at N=100 | 2.4× <sub>(2.1–2.7)</sub> | DBOS, same concurrency | ≥ 2.0 | ✔ |" in table
    assert "| commit → message p50, 1 client (ms) | 3.25 |  | ≤ 5 | ✔ |" in table
    assert "4 of 5 goals met" in table and "2026-11-24 to 2026-11-25" in table
    assert "- `resume`: the lease runs out a tick before the scheduler sees it" in table
    assert "LLM calls" not in table
    assert "docs/bench.svg" in table
    faults = text.split(report.FAULTS_BEGIN)[1].split(report.FAULTS_END)[0]
    assert "| sigkill | 10 | 20 | 10 | 0 |" in faults and "| stuck runs | 0 | = 0 | ✔ |" in faults
    svg = xml.dom.minidom.parse(str(chart))
    labels = [t.firstChild.data for t in svg.getElementsByTagName("text") if t.firstChild]
    assert "throughput · ratio_vs_dbos_n100" in labels and "realtime · ws_p50_ms" in labels

    # Rendering again changes nothing: the blocks are replaced, not appended.
    before = readme.read_text()
    report.main([str(results), "--readme", str(readme), "--svg", str(chart)])
    assert readme.read_text() == before
