"""The DBOS Transact side of the comparison: a workflow of the same no-op steps (imported only by
bench/dbos_worker.py, in processes of its own: no Django here)."""

from __future__ import annotations

from dbos import DBOS


def noop(i: int) -> int:
    """The same step as bench.agents.noop."""
    return i


@DBOS.step()
def dbos_noop_step(i: int) -> int:
    return noop(i)


@DBOS.workflow()
def dbos_noop_workflow(steps: int) -> int:
    total = 0
    for i in range(steps):
        total += dbos_noop_step(i)
    return total
