"""Run Dex's benchmarks and write bench/results/latest.json (shared BENCH.md is the contract).

    uv run python bench/run.py                 # every scenario, full sizes (may take 30 minutes)
    uv run python bench/run.py --quick         # what a reviewer runs: under 5 minutes
    uv run python bench/run.py --only step_overhead
    uv run python bench/report.py bench/results/latest.json   # README table + docs/bench.svg from saved results
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        uv run python bench/run.py --quick     # against servers instead of the embedded ones

With no DATABASE_URL the embedded Postgres and Redis under .dex/ are used (started if need be). The bench
creates and uses its own databases on that server (`dex_bench`, `dex_bench_dbos`; `DEX_BENCH_DATABASE`
renames them), its own Celery queue and Channels prefix, and stops every process it starts.
Benchmarks are not tests: nothing here asserts a time; goals are reported as met or not.
After a run whose result file is in bench/results/ (not --tiny), bench/report.py regenerates README.md's results
table and docs/bench.svg; each scenario's result is also kept in bench/results/<scenario>.json, so `--only X`
replaces X's figures and keeps the others'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.scenarios import SCENARIOS, load  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run Dex's benchmarks (see shared BENCH.md).")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: finishes in under 5 minutes")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes that still compute every figure")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this scenario (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="don't regenerate README.md's tables and docs/bench.svg (done by default after a run whose result "
        "file is in bench/results/, except at --tiny sizes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = args.only or list(SCENARIOS)
    modules = [load(name) for name in names]
    sizes = harness.TINY if args.tiny else harness.QUICK if args.quick else harness.FULL

    # SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so the worker processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        env = harness.bootstrap(sizes, stack)
        machine = harness.machine_description(env)
        config = harness.config_description(env)
        harness.log(f"{machine}; sizes {sizes.name}; session {env.session}")
        results: dict[str, dict] = {}
        for module in modules:
            harness.log(f"scenario {module.NAME}")
            with contextlib.ExitStack() as scenario_stack:
                env.stack = scenario_stack  # what a scenario starts is stopped when it ends
                try:
                    result = module.run(env)
                except BaseException:
                    harness.dump_logs(env)
                    raise
            result["when"] = _now()
            result["machine"] = machine
            result["sizes_name"] = sizes.name
            results[module.NAME] = result
            _write(args.out, machine, sizes.name, config, results)
            if sizes.name != "tiny" and args.out.name != f"{module.NAME}.json":
                # One file per scenario beside the result file: the report merges the newest of each.
                _write_scenario(args.out.parent / f"{module.NAME}.json", module.NAME, result)
            _summary(module.NAME, result)
        env.stack = stack
        harness.log(f"done in {time.monotonic() - started:.0f} s; wrote {args.out}")
    # Any result file in bench/results/ feeds the README (the report merges every file there); one elsewhere
    # (a smoke test's) doesn't.
    if not args.no_report and sizes.name != "tiny" and args.out.resolve().parent == DEFAULT_OUT.resolve().parent:
        from bench import report

        report.render(args.out)
        harness.log(f"wrote {report.README.name} (between its bench markers) and {report.SVG.relative_to(ROOT)}")
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(out: Path, machine: str, sizes: str, config: dict, results: dict[str, dict]) -> None:
    """Write `results` into `out`, keeping other scenarios' entries from an earlier run (each has its own
    `when`)."""
    previous: dict = {}
    if out.exists():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(out.read_text())
    scenarios = {**previous.get("scenarios", {}), **results}
    document = {
        "machine": machine,
        "when": _now(),
        "sizes": sizes,
        "python": platform.python_version(),
        "config": config,
        "scenarios": scenarios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(out)


def _write_scenario(path: Path, name: str, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"scenario": name, "result": result}, indent=2) + "\n")
    tmp.replace(path)


def _summary(name: str, result: dict) -> None:
    ranges = result.get("ranges", {})
    lines = [f"{name}: goals {'met' if result['met'] else 'NOT met'}"]
    for key, value in result["figures"].items():
        span = ranges.get(key)
        goal = result["goal"].get(key, "")
        extra = f"  ({span[0]:g}–{span[1]:g})" if span else ""
        mark = ""
        if goal:
            mark = f"  goal {goal}: {'met' if result['goals_met'][key] else 'NOT met'}"
        lines.append(f"  {key:<42} {value:g}{extra}{mark}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
