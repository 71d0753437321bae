"""Run Dex's benchmarks and write bench/results/latest.json (shared BENCH.md is the contract).

    uv run python bench/run.py --quick         # what a reviewer runs (well under 10 minutes): the README table
    uv run python bench/run.py                 # the README table's scenarios at full sizes (may take 30 minutes)
    uv run python bench/run.py --only step_overhead          # one scenario; leaves the README alone
    uv run python bench/run.py --only faults                 # the reliability table (its own run)
    uv run python bench/report.py bench/results/readme.json  # re-render the README table + docs/bench.svg
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        uv run python bench/run.py --quick     # against servers instead of the embedded ones

With no DATABASE_URL the embedded Postgres and Redis under .dex/ are used (started if need be). The bench
creates and uses its own databases on that server (`dex_bench`, `dex_bench_dbos`; `DEX_BENCH_DATABASE`
renames them), its own Celery queue and Channels prefix, and stops every process it starts. The peers
(Restate, Temporal) are installed on first use into bench/.peers/ (bench/peerkit.py); DEX_BENCH_PEERS=off
skips them. Benchmarks are not tests: nothing here asserts a time; goals are reported as met or not.

One run, one table (shared BENCH.md): a run's result file holds that run's scenarios only, with `uptime`'s
load average before and after each, the Postgres version and the commit floor. A run that covered every
scenario of the README table (not --tiny) is copied to bench/results/readme.json, which is committed, and the
README table and docs/bench.svg are rendered from it alone; `--only faults` renders the reliability table from
its own run the same way (bench/results/faults.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python bench/run.py` puts bench/ first on sys.path, where bench/agents.py would shadow the OpenAI Agents SDK
# (`import agents`, e.g. in the triage example): the bench's own modules are imported as `bench.*` instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness, measure  # noqa: E402
from bench.scenarios import SCENARIOS, load  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
README_RESULTS = ROOT / "bench" / "results" / "readme.json"
FAULTS_RESULTS = ROOT / "bench" / "results" / "faults.json"
# What a run without --only runs: the README table's scenarios. The faults scenario has a table of its own,
# made by its own run (`--only faults`).
DEFAULT_SCENARIOS = [name for name in SCENARIOS if name != "faults"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run Dex's benchmarks (see shared BENCH.md).")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: finishes well under 10 minutes")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes that still compute every figure")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this scenario (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="don't regenerate README.md's tables and docs/bench.svg (done by default after a run of every "
        "README scenario, or of the faults scenario, except at --tiny sizes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = args.only or DEFAULT_SCENARIOS
    modules = [load(name) for name in names]
    sizes = harness.TINY if args.tiny else harness.QUICK if args.quick else harness.FULL

    # SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so the worker processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        env = harness.bootstrap(sizes, stack)
        document = {
            "machine": harness.machine_description(env),
            "when": _now(),
            "sizes": sizes.name,
            "python": platform.python_version(),
            "postgres": env.probe.describe() if env.probe else "",
            "config": harness.config_description(env),
            "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "load_before": measure.load_average(),
            "scenarios": {},
        }
        measure.log(f"{document['machine']}; sizes {sizes.name}; session {env.session}")
        measure.log(f"load before: {document['load_before']['uptime']}")
        for module in modules:
            measure.log(f"scenario {module.NAME}")
            load_before = measure.load_average()
            with contextlib.ExitStack() as scenario_stack:
                env.stack = scenario_stack  # what a scenario starts is stopped when it ends
                try:
                    result = module.run(env)
                except BaseException:
                    harness.dump_logs(env)
                    raise
            result["when"] = _now()
            result["sizes_name"] = sizes.name
            result["load_before"] = load_before["load"]
            result["load_after"] = measure.load_average()["load"]
            document["scenarios"][module.NAME] = result
            _write(args.out, document)
            _summary(module.NAME, result)
        env.stack = stack
        document["load_after"] = measure.load_average()
        document["seconds"] = round(time.monotonic() - started, 1)
        _write(args.out, document)
        measure.log(f"load after: {document['load_after']['uptime']}")
        measure.log(f"done in {time.monotonic() - started:.0f} s; wrote {args.out}")
    if not args.no_report and sizes.name != "tiny":
        _publish(args.out, document)
    return 0


def _publish(out: Path, document: dict) -> None:
    """A run of every README scenario becomes bench/results/readme.json and the README table; a run of the
    faults scenario becomes bench/results/faults.json and the reliability table. Nothing else is merged in."""
    from bench import report

    ran = set(document["scenarios"])
    targets = []
    if set(report.ORDER) <= ran:
        targets.append(README_RESULTS)
    if "faults" in ran:
        targets.append(FAULTS_RESULTS)
    for target in targets:
        if out.resolve() != target.resolve():
            shutil.copyfile(out, target)
        report.render(target)
        measure.log(f"wrote {target} and rendered it into {report.README}")
    if not targets:
        measure.log("README left alone: only a run of every README scenario (or of faults) is rendered into it")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(out: Path, document: dict) -> None:
    """Write this run's document (its scenarios so far) to `out`; nothing of an earlier run is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(out)


def _summary(name: str, result: dict) -> None:
    ranges = result.get("ranges", {})
    lines = [f"{name}: goals {'met' if result['met'] else 'NOT met'}"]
    for key, value in result["figures"].items():
        span = ranges.get(key)
        goal = result["goal"].get(key, "")
        extra = f"  ({span[0]:g}–{span[1]:g})" if span else ""
        mark = ""
        if goal:
            verdict = result["goals_met"].get(key)
            mark = f"  goal {goal}: {'met' if verdict else 'not measured' if verdict is None else 'NOT met'}"
        lines.append(f"  {key:<42} {value:g}{extra}{mark}")
    for key, goal in result["goal"].items():
        if key not in result["figures"]:
            lines.append(f"  {key:<42} not measured  goal {goal}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
