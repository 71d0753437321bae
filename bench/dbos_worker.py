"""One DBOS Transact process of the bench: `python -m bench.dbos_worker SYSTEM_DATABASE_URL`.

DBOS executes a workflow in the process that calls it, so the bench gives DBOS as many OS processes as Dex has
worker processes (shared BENCH.md, "equal resources") and hands each its share of the workflows over
stdin/stdout, one JSON object a line (bench.harness.LineProcess): a request `{"n": N, "steps": S}` runs N
workflows of S no-op steps one after another, as a Dex worker process runs its runs, and answers
`{"latencies_ms": [...], "failed": F}` (a latency per workflow that returned the right total, from the request's
arrival). The first line written is `{"ready": true}`.
"""

from __future__ import annotations

import json
import logging
import sys
import time


def main(url: str) -> None:
    from dbos import DBOS

    from bench.dbos_app import dbos_noop_workflow

    DBOS(config={"name": "dex-bench", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()
    logging.getLogger("dbos").setLevel(logging.WARNING)
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            n, steps = int(request["n"]), int(request["steps"])
            t0 = time.perf_counter()
            latencies: list[float] = []
            errors: list[str] = []
            for _ in range(n):
                try:
                    total = dbos_noop_workflow(steps)
                except Exception as exc:  # a failed workflow is counted, not a crash of the process
                    errors.append(repr(exc)[:300])
                    continue
                if total == sum(range(steps)):
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors.append(f"wrong total {total}")
            print(json.dumps({"latencies_ms": latencies, "failed": len(errors), "errors": errors[:5]}), flush=True)
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
