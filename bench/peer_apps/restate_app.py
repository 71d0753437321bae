"""Restate's side of the comparison: a service whose handler runs the same no-op steps as Dex's bench task,
each a journaled `ctx.run_typed` (served by hypercorn; runs in the peers' own venv, bench/.peers/venv).

    hypercorn --workers K --bind 127.0.0.1:PORT restate_app:app
"""

from __future__ import annotations

import restate

noop_service = restate.Service("DexBenchNoop")


def noop(i: int) -> int:
    return i


@noop_service.handler()
async def run(ctx: restate.Context, steps: int) -> int:
    total = 0
    for i in range(steps):
        total += await ctx.run_typed(f"s{i}", noop, restate.RunOptions(max_attempts=1), i)
    return total


app = restate.app(services=[noop_service])
