"""The second deploy of the same task: a new step before the sleep, guarded by ctx.patched so runs that
passed that point under the first deploy keep their old path."""

from __future__ import annotations

from runs.sdk import task
from tests.versions import note


@task("g-versioned")
def versioned(ctx, ledger: str, seconds: float = 2.0) -> str:
    ctx.step("one", note, ledger, "one")
    if ctx.patched("extra-step"):
        ctx.step("extra", note, ledger, "extra")
    ctx.sleep("nap", seconds)
    return ctx.step("two", note, ledger, "two")
