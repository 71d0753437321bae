"""The scenarios, by name. Each is a module with `NAME`, `GOAL` and `run(env) -> dict` (its result entry:
`figures`, `goal`, `met`, and whatever detail helps read them). Later scenarios register here."""

from __future__ import annotations

import importlib
from types import ModuleType

SCENARIOS: dict[str, str] = {
    "step_overhead": "bench.scenarios.step_overhead",
    "parked": "bench.scenarios.parked",
    "llm_savings": "bench.scenarios.llm_savings",
    "throughput": "bench.scenarios.throughput",
    "resume": "bench.scenarios.resume",
    "realtime": "bench.scenarios.realtime",
    "dashboard": "bench.scenarios.dashboard",
    "faults": "bench.scenarios.faults",
}


def load(name: str) -> ModuleType:
    try:
        return importlib.import_module(SCENARIOS[name])
    except KeyError:
        raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
