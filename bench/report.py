"""Render one benchmark run's results into README.md and docs/bench.svg.

    uv run python bench/report.py                        # bench/results/readme.json (and faults.json)
    uv run python bench/report.py RESULTS --readme OTHER.md --svg OTHER.svg   # anywhere else (the smoke test)

`bench/run.py` calls it after a run of every README scenario (and after a run of `faults`). One run, one
table (shared BENCH.md): the table is made from the one result file given, never merged with another run's.

README.md gets generated blocks, each between its markers (created at the end of the file if missing):
  <!-- bench:begin --> … <!-- bench:end -->    the engines side by side (ms per step, 10 sequential no-op
      steps; steps/s, 100 concurrent 10-step runs), then one table of every scenario of shared BENCH.md: the
      headline figures (ratios against their baseline where BENCH.md defines one), the goal, met ✔ / ✘ and by
      how much a missed one misses, the range over repeats; under it the run's load average (`uptime`, before
      and after), Postgres version, commit floor, which peers were skipped and why
  <!-- faults:begin --> … <!-- faults:end -->  the reliability table of the `faults` scenario, if the file has it
docs/bench.svg is a bar per goal: the figure over its goal's bound (for "≥" goals the bound over the figure), so
1.0 is the goal line and a bar left of it is a goal met; counts that must be 0 are shown as met / not met.
No third-party dependency: the SVG is written by hand.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SVG = ROOT / "docs" / "bench.svg"
BENCH_BEGIN, BENCH_END = "<!-- bench:begin -->", "<!-- bench:end -->"
FAULTS_BEGIN, FAULTS_END = "<!-- faults:begin -->", "<!-- faults:end -->"

ORDER = ["step_overhead", "throughput", "resume", "realtime", "parked", "dashboard", "llm_savings"]
DEFAULT_RESULTS = ROOT / "bench" / "results" / "readme.json"
FAULTS_RESULTS = ROOT / "bench" / "results" / "faults.json"
# The engines side by side: (name, what, sequential ms-per-step figure, steps/s figure at N=100).
ENGINES = [
    ("Dex", "end to end: trigger → worker → completed", "dex_ms_per_step", "steps_per_s_n100"),
    ("Dex, engine alone", "`run_execute` in process", "dex_inprocess_ms_per_step", None),
    ("DBOS Transact", "one DBOS process per Dex worker process", "dbos_ms_per_step", "dbos_steps_per_s_n100"),
    (
        "Restate",
        "server (WAL fsync on) + Python SDK under hypercorn",
        "restate_ms_per_step",
        "restate_steps_per_s_n100",
    ),
    (
        "Temporal, activities",
        "dev server, SQLite synchronous=FULL",
        "temporal_activities_ms_per_step",
        "temporal_activities_steps_per_s_n100",
    ),
    ("Temporal, local activities", "same server", "temporal_local_ms_per_step", "temporal_local_steps_per_s_n100"),
    (
        "Temporal, tuned dev server",
        "activities; history-queue poll rates raised",
        "temporal_tuned_ms_per_step",
        "temporal_tuned_steps_per_s_n100",
    ),
    (
        "Celery chain (not durable)",
        "Dex's settings: acks_late, prefetch 1",
        "celery_chain_ms_per_step",
        "celery_chain_steps_per_s_n100",
    ),
    (
        "Celery chain (not durable)",
        "Celery's defaults: prefetch 4",
        "celery_chain_defaults_ms_per_step",
        "celery_chain_defaults_steps_per_s_n100",
    ),
]
PEER_FOR_ENGINE = {
    "Restate": "restate",
    "Temporal, activities": "temporal_activities",
    "Temporal, local activities": "temporal_local",
    "Temporal, tuned dev server": "temporal_tuned",
}
TITLES = {
    "step_overhead": "Step overhead (10 no-op steps)",
    "throughput": "Throughput (N concurrent 10-step runs)",
    "resume": "Resume after a failure in step 9 of 10",
    "realtime": "Step commit → websocket message",
    "parked": "Parked runs (sleeping / waiting for an event)",
    "dashboard": "Dashboard at 100k runs / 1M steps",
    "llm_savings": "LLM calls saved by a retry",
    "faults": "Reliability under faults",
}
# The figures each scenario's table shows besides its goals: (key, what it is, its baseline if it is a ratio).
HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "step_overhead": [
        ("dex_ms_per_step", "ms per durable step, end to end", ""),
        ("ratio_vs_dbos", "time per step, end to end", "DBOS Transact workflow step"),
        ("ratio_inprocess_vs_dbos", "time per step, engine in process", "DBOS Transact workflow step"),
        ("ratio_vs_restate", "time per step, end to end", "Restate (WAL fsync on)"),
        ("ratio_vs_celery_chain", "time per step", "Celery chain link (not durable)"),
        ("ratio_inprocess_vs_commit_floor", "time per step, engine in process", "one-row INSERT commit (prepared)"),
        ("write_commits_per_step", "write commits per step, whole run (trigger, claim, settle counted)", ""),
        ("write_commits_per_step_marginal", "write commits per step, steady state", ""),
        ("cpu_ms_per_step", "CPU ms per step, all processes", ""),
        ("ratio_vs_commit_floor", "time per step, end to end", "one-row INSERT commit (prepared)"),
        ("ratio_vs_temporal_local", "time per step", "Temporal, local activities"),
        ("fraction_of_pgbench_floor", "single-chain steps/s", "pgbench -M prepared, one-row INSERT"),
        ("dbos_write_commits_per_step", "DBOS write commits per step", ""),
    ],
    "throughput": [
        ("steps_per_s_n100", "steps/s, 100 concurrent runs", ""),
        ("ratio_vs_dbos_n100", "steps/s at N=100", "DBOS, same number of processes"),
        ("ratio_vs_restate_n100", "steps/s at N=100", "Restate, same number of SDK processes"),
        ("ratio_vs_celery_chain_n100", "steps/s at N=100", "Celery chains, Dex's settings"),
        ("ratio_vs_celery_chain_defaults_n100", "steps/s at N=100", "Celery chains, Celery's defaults"),
        ("ratio_vs_dbos_n10", "steps/s at N=10", "DBOS"),
        ("ratio_vs_dbos_n1", "steps/s at N=1", "DBOS"),
        ("run_p99_ms_n100", "run latency p99 at N=100 (ms)", ""),
        ("lost_runs", "lost runs", ""),
    ],
    "resume": [
        ("reexecuted_steps_exception", "steps re-executed after an exception", ""),
        ("reexecuted_steps_sigkill", "steps re-executed after SIGKILL", ""),
        ("recovery_s_sigkill", "SIGKILL → step 9 runs again (s)", ""),
        ("recovery_fraction_of_lease", "recovery time", "the lease"),
        ("committed_steps_reexecuted", "committed steps re-executed", ""),
    ],
    "realtime": [
        ("ws_p50_ms", "commit → message p50, 1 client (ms)", ""),
        ("ratio_p50_vs_redis", "p50 latency", "raw Redis PUBLISH→SUBSCRIBE"),
        ("ws_p99_ms_100_clients", "p99 at 100 clients (ms)", ""),
        ("ws_p99_ms_1000_clients", "p99 at 1,000 clients (ms)", ""),
        ("ratio_p99_100_clients_vs_redis", "p99 at 100 clients", "raw Redis, 100 subscribers"),
        ("ratio_p99_1000_clients_vs_redis", "p99 at 1,000 clients", "raw Redis, 1,000 subscribers"),
        ("lost_messages", "lost messages", ""),
        ("cpu_ms_per_step_1_watcher", "CPU ms per (paced) step, 1 watcher, daphne included", ""),
    ],
    "parked": [
        ("worker_slots_held", "worker slots held while parked", ""),
        ("worker_rss_growth_mb", "worker RSS growth (MB)", ""),
        ("rss_growth_ratio_vs_celery_eta", "RSS growth", "Celery countdown tasks"),
        ("idle_queries_per_s", "scheduler queries/s when idle", ""),
        ("wake_steps_per_s", "steps/s while waking all", ""),
        ("wake_p99_s", "wake latency p99 (s)", ""),
    ],
    "dashboard": [
        ("queries_per_page", "SQL queries per page (max)", ""),
        ("list_p95_ms_100k", "run list p95 at 100k runs (ms)", ""),
        ("ratio_p95_100k_vs_1k", "run list p95", "the same pages at 1k runs"),
        ("unbounded_counts", "COUNT(*) over a whole table", ""),
        ("full_scans_100k", "plans reading a whole table", ""),
    ],
    "llm_savings": [
        ("llm_calls_first", "LLM calls, first execution", ""),
        ("llm_calls_retry", "LLM calls, retry", ""),
        ("naive_calls_retry", "LLM calls a full re-run would make", ""),
        ("cost_saved_fraction", "cost saved", "re-running every LLM step"),
    ],
}
FAULT_COLUMNS = [
    ("runs", "runs"),
    ("faults", "faults"),
    ("completed", "completed"),
    ("reexecuted_committed_steps", "committed steps re-run"),
    ("inflight_reruns", "in-flight re-runs"),
    ("stuck_runs", "stuck"),
    ("missed_events", "missed events"),
    ("recovery_s_median", "recovery s (median)"),
    ("recovery_s_max", "recovery s (max)"),
]


# --- loading --------------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    """The document of one run (bench/run.py's result file); --tiny results never reach the README."""
    document: dict = json.loads(path.read_text())
    scenarios = document.get("scenarios", {})
    document["scenarios"] = {name: r for name, r in scenarios.items() if sizes_of(r) != "tiny"}
    return document


# --- formatting -------------------------------------------------------------------------------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def sizes_of(result: dict) -> str:
    """The sizes a result was measured at (`quick`, `full`, `tiny`), or "" if it doesn't say."""
    if result.get("sizes_name"):
        return str(result["sizes_name"])
    sizes = result.get("sizes")
    return str(sizes.get("name", "")) if isinstance(sizes, dict) else ""


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return f"{int(value):,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return _esc(str(value))


def _goal_text(goal: str) -> str:
    return goal.replace("<=", "≤").replace(">=", "≥").replace("==", "=").strip()


def _rows(name: str, result: dict) -> list[dict]:
    """The rows of a scenario: its goals first (in their order), then its other headline figures."""
    figures = result.get("figures", {})
    goals = result.get("goal", {})
    met = result.get("goals_met", {})
    ranges = result.get("ranges", {})
    known = {key: (what, base) for key, what, base in HEADLINES.get(name, [])}
    keys = list(goals) + [k for k, _, _ in HEADLINES.get(name, []) if k not in goals]
    if name not in HEADLINES:
        keys += [k for k, v in figures.items() if k not in goals and isinstance(v, int | float)][:6]
    rows = []
    for key in keys:
        if key not in figures:
            if key in goals:  # a goal against a peer that was skipped: said, not dropped
                what, base = known.get(key, (key.replace("_", " "), ""))
                rows.append(
                    {
                        "key": key,
                        "what": what,
                        "baseline": base,
                        "value": None,
                        "range": None,
                        "goal": goals[key],
                        "met": None,
                        "unmeasured": True,
                    }
                )
            continue
        what, base = known.get(key, (key.replace("_", " "), ""))
        rows.append(
            {
                "key": key,
                "what": what,
                "baseline": base,
                "value": figures[key],
                "range": ranges.get(key),
                "goal": goals.get(key, ""),
                "met": met.get(key) if key in goals else None,
            }
        )
    return rows


def missed_by(value: float, goal: str) -> str:
    """How far a figure is from its goal, in words: "by 16 %", "6.1× the bound", "by 3"."""
    match = _BOUND.match(goal)
    if not match:
        return ""
    op, bound = match.group(1), float(match.group(2))
    if bound == 0 or op == "==":
        return f"by {fmt(abs(value - bound))}"
    if op in ("<=", "<"):
        factor = value / bound
        return f"{factor:.2g}× the bound" if factor >= 2 else f"by {(factor - 1) * 100:.0f} %"
    if value <= 0:
        return "nothing measured"
    return f"by {(1 - value / bound) * 100:.0f} %" if value / bound > 0.5 else f"{bound / value:.2g}× short"


def _met_cell(row: dict) -> str:
    if row.get("unmeasured"):
        return "not measured"
    if row["met"] is None:
        return ""
    return "✔" if row["met"] else f"✘ {missed_by(row['value'], row['goal'])}"


def _value_cell(row: dict) -> str:
    if row.get("unmeasured"):
        return "–"
    text = fmt(row["value"])
    if row["baseline"]:
        text += "×"
    span = row["range"]
    if span and span[0] != span[1]:
        text += f" <sub>({fmt(span[0])}–{fmt(span[1])})</sub>"
    return text


def _when(result: dict) -> str:
    return str(result.get("when", ""))[:10]


def engines_table(document: dict) -> str | None:
    """Every engine of the run side by side: ms per step (10 sequential no-op steps) and steps/s (100
    concurrent 10-step runs), each from this run's alternation."""
    scenarios = document.get("scenarios", {})
    step, through = scenarios.get("step_overhead", {}), scenarios.get("throughput", {})
    if not step and not through:
        return None
    skipped = {**step.get("skipped_peers", {}), **through.get("skipped_peers", {})}
    not_runnable = step.get("not_runnable_peers") or through.get("not_runnable_peers") or {}
    lines = [
        "| engine | how it ran | ms per step, 10 sequential no-op steps <sub>(min–max)</sub> "
        "| steps/s, 100 concurrent 10-step runs <sub>(min–max)</sub> |",
        "|---|---|---|---|",
    ]

    def cell(result: dict, key: str | None) -> str:
        if not key or key not in result.get("figures", {}):
            return "–"
        span = result.get("ranges", {}).get(key)
        text = fmt(result["figures"][key])
        return text + (f" <sub>({fmt(span[0])}–{fmt(span[1])})</sub>" if span and span[0] != span[1] else "")

    for name, how, seq, conc in ENGINES:
        peer = PEER_FOR_ENGINE.get(name)
        if peer and peer in skipped and seq not in step.get("figures", {}):
            lines.append(f"| {name} | skipped: {_esc(skipped[peer])} | – | – |")
            continue
        lines.append(f"| {name} | {how} | {cell(step, seq)} | {cell(through, conc)} |")
    for name, why in not_runnable.items():
        lines.append(f"| {name.capitalize()} | can't run here: {_esc(why)} | – | – |")
    versions = {**through.get("versions", {}), **step.get("versions", {})}
    if versions:
        lines.append("")
        lines.append("Versions: " + ", ".join(f"{_esc(k)} {_esc(str(v))}" for k, v in sorted(versions.items())) + ".")
    return "\n".join(lines)


def bench_table(document: dict) -> str:
    scenarios = document.get("scenarios", {})
    names = [n for n in ORDER if n in scenarios] + [n for n in scenarios if n not in ORDER and n != "faults"]
    if not names:
        return "_No benchmark results yet: run `uv run python bench/run.py --quick`._"
    lines = []
    engines = engines_table(document)
    if engines:
        lines += [engines, ""]
    lines += [
        "| scenario | figure | value <sub>(min–max over repeats)</sub> | against | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        result = scenarios[name]
        for i, row in enumerate(_rows(name, result)):
            scenario = f"**{TITLES.get(name, name)}** <sub>`{name}`</sub>" if i == 0 else ""
            lines.append(
                f"| {scenario} | {row['what']} | {_value_cell(row)} | {_esc(row['baseline'])} | "
                f"{_esc(_goal_text(row['goal']))} | {_met_cell(row)} |"
            )
    goals = [m for n in names for m in scenarios[n].get("goals_met", {}).values()]
    measured = [m for m in goals if m is not None]
    unmeasured = len(goals) - len(measured)
    lines.append("")
    lines.append(
        f"**{sum(measured)} of {len(measured)} goals met**"
        + (f" ({unmeasured} not measured: their peer was skipped)" if unmeasured else "")
        + f". {_provenance(document, names)}"
    )
    # Why a goal is missed, where the scenario knows (its result's `missed_because`).
    why = [
        f"- `{n}`: {_esc(str(scenarios[n]['missed_because']))}"
        for n in names
        if scenarios[n].get("missed_because") and not scenarios[n].get("met", True)
    ]
    if why:
        lines += ["", "Goals missed, and why:", *why]
    lines.append("")
    lines.append(
        "Ratios (×) are Dex's figure over the baseline's, measured side by side in the same run (variants "
        "alternated after a warm-up, 5 repeats, median with min–max; shared BENCH.md). For throughput a ratio "
        "above 1 means Dex is faster; for times below 1 means Dex is faster. Every engine gets as many OS "
        "processes as Dex's worker has; fsync and synchronous_commit stay on."
    )
    lines.append("")
    lines.append("![Dex benchmark figures against their goals](docs/bench.svg)")
    return "\n".join(lines)


def _load_text(load: Any) -> str:
    if isinstance(load, dict):
        load = load.get("load")
    if isinstance(load, list) and len(load) == 3:
        return " / ".join(f"{x:.2f}" for x in load)
    return "unknown"


def _provenance(document: dict, names: list[str]) -> str:
    scenarios = document["scenarios"]
    when = str(document.get("when", ""))[:10] or "an unknown date"
    sizes = str(document.get("sizes", "")) or ", ".join(sorted({sizes_of(scenarios[n]) for n in names} - {""}))
    parts = [f"Measured {when} in one `{document.get('command') or 'bench/run.py'}` run ({sizes} sizes"]
    if document.get("seconds"):
        parts[-1] += f", {float(document['seconds']) / 60:.1f} min"
    parts[-1] += f") on {document.get('machine') or 'an unknown machine'}."
    if document.get("postgres") and document["postgres"] not in str(document.get("machine", "")):
        parts.append(f"{document['postgres']}.")
    before, after = document.get("load_before"), document.get("load_after")
    if before or after:
        parts.append(f"Load average (1/5/15 min, `uptime`): {_load_text(before)} before, {_load_text(after)} after.")
    floor = scenarios.get("step_overhead", {}).get("figures", {})
    if "commit_floor_ms" in floor:
        text = f"Commit floor: {fmt(floor['commit_floor_ms'])} ms (a prepared one-row INSERT in autocommit)"
        if "pgbench_floor_tps" in floor:
            text += f", pgbench -M prepared {fmt(floor['pgbench_floor_tps'])} commits/s"
        parts.append(text + ".")
    skipped = {}
    for n in names:
        skipped.update(scenarios[n].get("skipped_peers", {}))
    if skipped:
        reasons: dict[str, list[str]] = {}
        for peer, why in skipped.items():
            reasons.setdefault(why, []).append(peer)
        parts.append("Peers skipped: " + "; ".join(f"{', '.join(p)} ({_esc(why)})" for why, p in reasons.items()) + ".")
    parts.append(
        "Regenerate with `uv run python bench/run.py --quick` (writes this table, the chart and "
        "bench/results/readme.json)."
    )
    return " ".join(parts)


def faults_table(document: dict) -> str | None:
    result = document.get("scenarios", {}).get("faults")
    if not result:
        return None
    lines = []
    detail = result.get("detail")
    if isinstance(detail, dict) and any(isinstance(v, dict) for v in detail.values()):
        present = [
            (k, label) for k, label in FAULT_COLUMNS if any(k in v for v in detail.values() if isinstance(v, dict))
        ]
        lines.append("| fault | " + " | ".join(label for _, label in present) + " |")
        lines.append("|---|" + "---|" * len(present))
        for fault, values in detail.items():
            if isinstance(values, dict):
                cells = [fmt(values.get(k)) for k, _ in present]
                lines.append(f"| {_esc(fault)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| figure | value | goal | met |")
    lines.append("|---|---|---|---|")
    for row in _rows("faults", result):
        mark = "" if row["met"] is None else ("✔" if row["met"] else "✘")
        lines.append(f"| {row['key'].replace('_', ' ')} | {fmt(row['value'])} | {_goal_text(row['goal'])} | {mark} |")
    lines.append("")
    lines.append(
        f"Real worker, scheduler, daphne, Postgres and Redis processes, faults injected by `bench/run.py --only "
        f"faults`; executions counted from an external ledger. {_provenance(document, ['faults'])}"
    )
    if result.get("note"):
        lines.append("")
        lines.append(_esc(str(result["note"])))
    return "\n".join(lines)


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between `begin` and `end` replaced by `body` (the markers appended if absent)."""
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


# --- the chart --------------------------------------------------------------------------------------------------

_BOUND = re.compile(r"^\s*(<=|>=|<|>|==)\s*(-?[0-9.]+)\s*$")
CAP = 3.0  # bars longer than 3× the goal are drawn to 3× and labelled


def chart_bars(document: dict) -> list[dict]:
    bars = []
    scenarios = document.get("scenarios", {})
    for name in [n for n in ORDER if n in scenarios] + [n for n in scenarios if n not in ORDER]:
        result = scenarios[name]
        for key, goal in result.get("goal", {}).items():
            value = result.get("figures", {}).get(key)
            match = _BOUND.match(goal)
            if value is None or not match or not isinstance(value, int | float):
                continue
            op, bound = match.group(1), float(match.group(2))
            met = bool(result.get("goals_met", {}).get(key))
            if bound == 0:
                score = None  # a count that must be 0: shown as met / not met
            elif op in (">=", ">"):
                score = bound / value if value > 0 else math.inf
            else:
                score = value / bound
            bars.append({"scenario": name, "key": key, "value": value, "goal": goal, "score": score, "met": met})
    return bars


def svg(document: dict) -> str:
    bars = chart_bars(document)
    width, label_w, bar_w, row_h, top = 900, 330, 380, 22, 58
    height = top + row_h * max(1, len(bars)) + 40
    x0 = label_w
    unit = bar_w / CAP
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        '<text x="12" y="22" font-size="15" font-weight="600" fill="#111">Dex against the goals of BENCH.md</text>',
        '<text x="12" y="40" fill="#555">bar = figure ÷ goal bound (for “≥” goals: bound ÷ figure); '
        "left of the line = goal met</text>",
    ]
    for tick in (0.5, 1.0, 2.0, 3.0):
        x = x0 + tick * unit
        colour = "#111" if tick == 1.0 else "#ddd"
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 30}" stroke="{colour}" '
            f'stroke-width="{1.5 if tick == 1.0 else 1}"/>'
        )
        caption = f"{tick:g}× goal" if tick == 1.0 else f"{tick:g}×"
        out.append(f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle" fill="#555">{caption}</text>')
    for i, bar in enumerate(bars):
        y = top + i * row_h
        colour = "#2e8b57" if bar["met"] else "#c0392b"
        label = f"{bar['scenario']} · {bar['key']}"
        out.append(f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end" fill="#222">{_esc(label)}</text>')
        value_text = f"{fmt(bar['value'])} (goal {_goal_text(bar['goal'])})"
        if bar["score"] is None:
            mark = "✔ met" if bar["met"] else "✘ not met"
            out.append(f'<text x="{x0 + 6}" y="{y + 14}" fill="{colour}">{mark}: {_esc(value_text)}</text>')
            continue
        score = bar["score"]
        length = min(score, CAP) * unit if math.isfinite(score) else CAP * unit
        out.append(f'<rect x="{x0}" y="{y + 4}" width="{max(length, 1.5):.1f}" height="{row_h - 8}" fill="{colour}"/>')
        arrow = " ▶" if not math.isfinite(score) or score > CAP else ""
        out.append(f'<text x="{x0 + length + 6:.1f}" y="{y + 14}" fill="#222">{_esc(value_text)}{arrow}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- entry point ------------------------------------------------------------------------------------------------


def render(results: Path, readme: Path = README, chart: Path = SVG) -> None:
    """Render the one run in `results` into `readme` (the tables its scenarios make) and, if it has the README
    table's scenarios, `chart`."""
    document = load(results)
    text = readme.read_text() if readme.exists() else ""
    table_scenarios = [n for n in document["scenarios"] if n != "faults"]
    if table_scenarios:
        text = replace_block(text, BENCH_BEGIN, BENCH_END, bench_table(document))
    faults = faults_table(document)
    if faults is not None:
        if FAULTS_BEGIN not in text:
            # A first reliability table goes right after the results table.
            text = text.replace(BENCH_END, f"{BENCH_END}\n\n{FAULTS_BEGIN}\n{FAULTS_END}", 1)
        text = replace_block(text, FAULTS_BEGIN, FAULTS_END, faults)
    readme.write_text(text)
    if table_scenarios:
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_text(svg(document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render benchmark results into the README and a chart.")
    parser.add_argument(
        "results",
        type=Path,
        nargs="*",
        help=f"result files of single runs (default: {DEFAULT_RESULTS.name}, and {FAULTS_RESULTS.name} if present)",
    )
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--svg", type=Path, default=SVG)
    args = parser.parse_args(argv)
    results = args.results or [p for p in (DEFAULT_RESULTS, FAULTS_RESULTS) if p.exists()]
    missing = [p for p in results if not p.exists()]
    if not results or missing:
        print(f"no results at {missing[0] if missing else DEFAULT_RESULTS}", file=sys.stderr)
        return 1
    for path in results:
        render(path, args.readme, args.svg)
    print(f"wrote {args.readme} and {args.svg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
