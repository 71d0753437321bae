"""Two deploys of one task (v1, v2): a worker loads one of them through DEX_AGENT_MODULES."""

from __future__ import annotations

from tests.agents import record


def note(ledger: str, line: str) -> str:
    record(ledger, line)
    return line
