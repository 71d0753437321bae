"""The first deploy of a task (tests/integration/test_versions.py): one, a sleep, two."""

from __future__ import annotations

from runs.sdk import task
from tests.versions import note


@task("g-versioned")
def versioned(ctx, ledger: str, seconds: float = 2.0) -> str:
    ctx.step("one", note, ledger, "one")
    ctx.sleep("nap", seconds)
    return ctx.step("two", note, ledger, "two")
