"""The fault scenarios shared by the CI subset (tests/faults) and the full counts (bench/scenarios/faults.py):
SIGKILLed workers, a poison run, a Redis outage, a Postgres restart, a daphne restart, a late result and
duplicate deliveries, each driven against a bench.faultkit Cluster and counted in its external ledger."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.faultkit import (
    TERMINAL,
    Cluster,
    Entry,
    Figures,
    PrivatePostgres,
    PrivateRedis,
    account,
    all_terminal,
    free_port,
    http_json,
    ledger_read,
    run_states_orm,
    run_states_sql,
    trigger_elsewhere,
    wait_until,
)


def sigkill_workers(
    cluster: Cluster,
    ledger: Path,
    *,
    runs: int,
    faults: int,
    steps: int = 6,
    pause: float = 0.25,
    workers: int = 2,
    timeout: float = 120,
) -> Figures:
    """SIGKILL the process executing a step (a worker's pool child, as the OOM killer would) `faults` times,
    then account. The worker's parent replaces the child; spare pool slots mean a recovered run waits for
    its lease to expire, not for capacity. Runs are triggered in this process (Django set up on the
    cluster's database). Recovery of a kill: from the kill to the killed run's next step execution."""
    from runs import services

    concurrency = max(2, runs // workers + 1)
    for _ in range(workers):
        cluster.worker(concurrency=concurrency)
    cluster.scheduler()
    payload = {"ledger": str(ledger), "steps": steps, "pause": pause}
    ids = [str(services.run_trigger(task_id="fault-chain", payload=payload)[0].id) for _ in range(runs)]
    states = lambda: run_states_orm(ids)  # noqa: E731
    kills: list[tuple[float, str]] = []  # (when, the run whose step was in flight)
    seen = 0
    for _ in range(faults):

        def fresh_entry(seen: int = seen) -> Entry | bool | None:
            entries = ledger_read(ledger)
            new = [e for e in entries[seen:] if cluster.owner_of(e.pid) is not None]
            if new:
                return new[-1]
            return all_terminal(states, len(ids))()  # True: nothing left to kill

        entry = wait_until(fresh_entry, timeout=timeout, what="a step to start")
        if not isinstance(entry, Entry):
            break  # every run finished before all the faults were spent: the figures say how many happened
        try:
            os.kill(entry.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append((time.time(), entry.run))
        seen = len(ledger_read(ledger))
    with contextlib.suppress(TimeoutError):
        wait_until(all_terminal(states, len(ids)), timeout=timeout, what="every run to finish", interval=0.2)
    entries = ledger_read(ledger)
    figures = account(entries, states(), steps=steps, faults=len(kills))
    recoveries = sorted(
        min(later) - when for when, run in kills if (later := [e.ts for e in entries if e.run == run and e.ts > when])
    )
    figures.detail["recovery_s_max"] = round(recoveries[-1], 3) if recoveries else None
    figures.detail["recovery_s_median"] = round(statistics.median(recoveries), 3) if recoveries else None
    return figures


def poison_run(cluster: Cluster, ledger: Path, *, max_recoveries: int, timeout: float = 90) -> dict:
    """A run whose step SIGKILLs its worker every time: it must end failed (WorkerLost) after
    `max_recoveries` recoveries, the poison step executed exactly that many times, the worker still up."""
    from runs import services
    from runs.models import Run

    env = {"DEX_MAX_RECOVERIES": str(max_recoveries)}
    worker = cluster.worker(**env)
    cluster.scheduler(**env)
    run, _ = services.run_trigger(
        task_id="fault-chain", payload={"ledger": str(ledger), "steps": 3, "pause": 0.05, "poison_step": "s2"}
    )
    ended = lambda: Run.objects.get(pk=run.pk).status in TERMINAL  # noqa: E731
    wait_until(ended, timeout=timeout, what="the poison run to end", interval=0.2)
    run.refresh_from_db()
    entries = [e for e in ledger_read(ledger) if e.run == str(run.pk)]
    return {
        "runs": 1,
        "faults": sum(e.step == "s2" for e in entries),  # each execution of the poison step killed its worker
        "stuck_runs": int(run.status not in TERMINAL),
        "status": run.status,
        "error_type": (run.error or {}).get("type"),
        "recoveries": run.recoveries,
        "poison_executions": sum(e.step == "s2" for e in entries),
        "s1_executions": sum(e.step == "s1" for e in entries),
        "worker_alive": worker.alive,
    }


def redis_outage(
    cluster: Cluster,
    redis: PrivateRedis,
    ledger: Path,
    *,
    secret: str,
    down_seconds: float,
    triggers: int,
    steps: int = 3,
    timeout: float = 120,
) -> dict:
    """Stop Redis (broker and channel layer) for `down_seconds` while clients keep triggering through the
    HTTP API; every trigger must be accepted (201) and every run complete once Redis is back."""
    port = free_port()
    cluster.daphne(port)
    cluster.worker()
    cluster.scheduler()
    base = f"http://127.0.0.1:{port}/api"
    payload = {"payload": {"ledger": str(ledger), "steps": steps, "pause": 0.05}}
    ids: list[str] = []
    statuses: list[int] = []
    status, body = http_json("POST", f"{base}/tasks/fault-chain/trigger", payload, secret=secret)
    statuses.append(status)
    ids.append(body.get("id") if isinstance(body, dict) else "")
    redis.stop()
    down_at = time.monotonic()
    slowest = 0.0
    for i in range(triggers):
        t0 = time.monotonic()
        status, body = http_json("POST", f"{base}/tasks/fault-chain/trigger", payload, secret=secret)
        slowest = max(slowest, time.monotonic() - t0)
        statuses.append(status)
        ids.append(body.get("id") if isinstance(body, dict) else "")
        # Spread the triggers over the outage.
        time.sleep(max(0.0, down_at + (i + 1) * down_seconds / triggers - time.monotonic()))
    redis.start()
    back_at = time.monotonic()
    accepted = [i for i, s in zip(ids, statuses, strict=True) if s == 201 and i]
    states = lambda: run_states_orm(accepted)  # noqa: E731
    with contextlib.suppress(TimeoutError):
        wait_until(all_terminal(states, len(accepted)), timeout=timeout, what="every run to finish", interval=0.2)
    drained = time.monotonic() - back_at
    figures = account(ledger_read(ledger), states(), steps=steps, faults=1)
    return {
        **figures.as_dict(),
        "triggers": len(statuses),
        "accepted": len(accepted),
        "statuses": sorted(set(statuses)),
        "slowest_trigger_s": round(slowest, 3),
        "down_s": round(back_at - down_at, 2),
        "drain_s_after_redis_back": round(drained, 2),
    }


def postgres_restart(
    cluster: Cluster,
    postgres: PrivatePostgres,
    ledger: Path,
    *,
    runs: int,
    restarts: int = 1,
    down_seconds: float = 1.0,
    steps: int = 6,
    pause: float = 0.2,
    timeout: float = 120,
) -> dict:
    """Restart Postgres `restarts` times while runs execute (worker and scheduler keep running); then account.
    The cluster's env must point DATABASE_URL at `postgres` (migrated)."""
    url = cluster.env["DATABASE_URL"]
    cluster.worker(concurrency=2)
    cluster.scheduler()
    payload = {"ledger": str(ledger), "steps": steps, "pause": pause}
    ids = trigger_elsewhere(cluster.env, "fault-chain", [payload] * runs)
    downs = []
    for n in range(restarts):
        wait_until(
            lambda n=n: len(ledger_read(ledger)) >= (n + 1) * max(2, runs * steps // (restarts + 1)),
            timeout=timeout,
            what="steps to execute before the restart",
        )
        downs.append(postgres.restart(down_seconds))
    states = lambda: run_states_sql(url, ids)  # noqa: E731
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_until(all_terminal(states, len(ids)), timeout=timeout, what="every run to finish", interval=0.3)
    # Each restart cuts every executing run: up to one in-flight step per executing run per restart.
    figures = account(ledger_read(ledger), states(), steps=steps, faults=restarts * 2)
    return {
        **figures.as_dict(),
        "restarts": restarts,
        "down_s": round(max(downs), 2) if downs else None,
        "finish_s_after_restart": round(time.monotonic() - t0, 2),
    }


def read_sse(response: Any) -> tuple[str, Any]:
    """The next event of a server-sent-events body (comments skipped); ("end", None) at its end."""
    fields: dict[str, str] = {}
    while True:
        line = response.readline()
        if not line:
            return "end", None
        text = line.decode().rstrip("\n")
        if text == "" and fields:
            return fields.get("event", "message"), json.loads(fields.get("data", "null"))
        if text and not text.startswith(":"):
            name, _, value = text.partition(": ")
            fields[name] = value


def completed_steps_seen(events: list[tuple[str, Any]]) -> set[str]:
    """Step keys a client knows completed: from snapshots (their steps) and live step events."""
    keys: set[str] = set()
    for kind, data in events:
        if kind == "snapshot":
            keys |= {s["key"] for s in data.get("steps", []) if s.get("status") == "completed"}
        elif kind == "step" and data.get("status") == "completed":
            keys.add(data["key"])
    return keys


# The trace view's hooks (DESIGN §6), not its classes, which change with the page's look.
_STEP_ROW = re.compile(r'data-step-key="([^"]+)" data-status="(\w+)"')


class PageFollower(threading.Thread):
    """A run page's websocket client (as the htmx extension is): reconnects whenever the socket drops and
    records every step row it is sent; the consumer's snapshot on (re)connect is how it catches up."""

    def __init__(self, port: int, run_id: str, cookie: str):
        super().__init__(name="dex-page-follower", daemon=True)
        self.url = f"ws://127.0.0.1:{port}/ws/runs/{run_id}/"
        self.origin = f"http://127.0.0.1:{port}"
        self.cookie = cookie
        self.completed: set[str] = set()
        self.connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        while not self.stop.is_set():
            try:
                with connect(
                    self.url, origin=self.origin, additional_headers={"Cookie": self.cookie}, open_timeout=5
                ) as ws:
                    self.connections += 1
                    while not self.stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            self._read(ws.recv(timeout=0.2))
            except (OSError, WebSocketException):
                self.stop.wait(0.2)  # daphne is down: try again, as the htmx extension does

    def _read(self, html: str | bytes) -> None:
        text = html.decode() if isinstance(html, bytes) else html
        for key, status in _STEP_ROW.findall(text):
            if status == "completed":
                self.completed.add(key)


def _session_cookie() -> str:
    """A logged-in dashboard session (a viewer) for the websocket, made in the database daphne reads."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_user(f"faults-{os.getpid()}-{time.time_ns()}", password=None)
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def daphne_restart(
    cluster: Cluster, ledger: Path, *, secret: str, restarts: int = 1, steps: int = 10, pause: float = 0.25
) -> dict:
    """Two clients follow a run while daphne is SIGKILLed and restarted `restarts` times: its SSE stream
    (JSON) and its dashboard page's websocket (HTML fragments). After each restart both reconnect, and the
    snapshot sent on connect repairs what they missed. Missed = completed steps a client never learned of."""
    import http.client

    from runs import services

    port = free_port()
    server = cluster.daphne(port)
    cluster.worker()
    payload = {"ledger": str(ledger), "steps": steps, "pause": pause}
    run, _ = services.run_trigger(task_id="fault-chain", payload=payload)
    page = PageFollower(port, str(run.pk), _session_cookie())
    page.start()
    events: list[tuple[str, Any]] = []
    connections = 0
    restarted = 0
    # Kill once the client has seen this many steps complete live on its current connection.
    kill_after = max(1, min(2, steps // (restarts + 1)))
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/api/runs/{run.pk}/stream", headers={"Authorization": f"Bearer {secret}"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the stream answered {response.status}: {response.read()[:500]!r}")
        connections += 1
        finished = False
        live = 0  # steps seen completing on this connection (not in its snapshot)
        while True:
            try:
                kind, data = read_sse(response)
            except (OSError, http.client.HTTPException):
                kind, data = "end", None
            if kind == "end":
                break
            events.append((kind, data))
            if kind == "run" and data.get("status") in TERMINAL:
                finished = True
                break
            if kind == "snapshot" and data["run"]["status"] in TERMINAL:
                finished = True
                break
            live += kind == "step" and data.get("status") == "completed"
            # Both clients are connected to this daphne before it dies.
            if restarted < restarts and live >= kill_after and page.connections > restarted:
                server.kill()
                restarted += 1
                time.sleep(pause * 2)  # steps complete while nobody listens
                server = cluster.daphne(port)
                break
        conn.close()
        if finished:
            break
    run.refresh_from_db()
    committed = set(run.steps.filter(status="completed").values_list("key", flat=True))
    # The page gets the run's last step with its final repaint; give it a moment after the stream ended.
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: committed <= page.completed, timeout=10, what="the page to show every step")
    page.stop.set()
    page.join(timeout=10)
    missed = committed - completed_steps_seen(events)
    page_missed = committed - page.completed
    return {
        "runs": 1,
        "faults": restarted,
        "completed": int(run.status == "completed"),
        "stuck_runs": int(run.status not in TERMINAL),
        "missed_events": len(missed) + len(page_missed),  # both clients together
        "status": run.status,
        "daphne_restarts": restarted,
        "connections": connections,
        "steps_committed": len(committed),
        "stream_missed_steps": sorted(missed),
        "page_connections": page.connections,
        "page_missed_steps": sorted(page_missed),
    }


def late_result(cluster: Cluster, ledger: Path, *, timeout: float = 60) -> dict:
    """A step that ignores its timeout and returns late: its result must be discarded and the retry's kept."""
    from runs import services
    from runs.models import Run

    cluster.worker()
    cluster.scheduler()
    run, _ = services.run_trigger(task_id="fault-late", payload={"ledger": str(ledger)})
    ended = lambda: Run.objects.get(pk=run.pk).status in TERMINAL  # noqa: E731
    wait_until(ended, timeout=timeout, what="the late run to end", interval=0.1)
    run.refresh_from_db()
    step = run.steps.get(key="s1")
    return {
        "runs": 1,
        "faults": 1,
        "completed": int(run.status == "completed"),
        "stuck_runs": int(run.status not in TERMINAL),
        "status": run.status,
        "output": run.output,
        "attempts": step.attempts,
        "first_error": (step.history[0]["error"]["message"] if step.history else ""),
        "attempts_in_ledger": [e.attempt for e in ledger_read(ledger) if e.run == str(run.pk)],
    }


def duplicate_deliveries(
    cluster: Cluster, ledger: Path, *, runs: int, copies: int, steps: int = 4, timeout: float = 60
) -> Figures:
    """Two workers, every run's wake-up sent `copies` extra times: every step must execute exactly once."""
    from runs import services
    from runs.models import Run
    from runs.tasks import execute_run

    cluster.worker(concurrency=2)
    cluster.worker(concurrency=2)
    payload = {"ledger": str(ledger), "steps": steps, "pause": 0.05}
    ids = [str(services.run_trigger(task_id="fault-chain", payload=payload)[0].id) for _ in range(runs)]
    for run_id in ids * copies:
        execute_run.delay(run_id)
    states = lambda: run_states_orm(ids)  # noqa: E731
    wait_until(all_terminal(states, len(ids)), timeout=timeout, what="every run to finish", interval=0.1)
    figures = account(ledger_read(ledger), states(), steps=steps, faults=0)
    tokens = set(Run.objects.filter(pk__in=ids).values_list("lease_token", flat=True))
    figures.detail["owners_per_run"] = max(tokens)  # the lease token counts claims: 1 = one owner ever
    return figures
