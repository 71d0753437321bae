"""Fixtures shared by the whole suite: real worker / scheduler / daphne processes pointed at the test
database, polling with a deadline, personas.

Every test session gets its own Celery queue and Channels prefix, so a `manage.py dev` running on the same
embedded Redis (or another test session) never takes this session's messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings

import tests.agents  # noqa: F401  (registers the test tasks in this process)
import tests.guarantee_agents  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SESSION = uuid.uuid4().hex[:8]


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def database_url(settings_dict: dict) -> str:
    user = quote(settings_dict.get("USER") or "")
    password = quote(settings_dict.get("PASSWORD") or "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or ""
    port = settings_dict.get("PORT") or ""
    name = settings_dict["NAME"]
    if host.startswith("/"):
        return f"postgresql://{auth}/{name}?host={quote(host, safe='/')}"
    return f"postgresql://{auth}{host}{':' + port if port else ''}/{name}"


@pytest.fixture(scope="session")
def dex_env(django_db_setup: None, django_db_blocker: Any) -> dict[str, str]:
    """Environment for child processes: the test database, this session's queue, a short lease."""
    from django.db import connection

    from dexweb.celery import app

    queue = f"dex-test-{SESSION}"
    settings.DEX_DEFAULT_QUEUE = queue
    settings.CELERY_TASK_DEFAULT_QUEUE = queue
    app.conf.task_default_queue = queue
    prefix = f"dex-test-{SESSION}"
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = prefix
    from channels.layers import channel_layers

    channel_layers.backends.clear()  # layers built before this read the old prefix
    with django_db_blocker.unblock():
        db_url = database_url(connection.settings_dict)
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "DEX_DEFAULT_QUEUE": queue,
        "DEX_CHANNEL_PREFIX": prefix,
        "DEX_LEASE_SECONDS": "2",
        "DEX_SCHEDULER_TICK_SECONDS": "0.1",
        "DEX_REQUEUE_STALE_SECONDS": "5",
        "DEX_AGENT_MODULES": "tests.agents,tests.guarantee_agents",
        "DEX_CONN_MAX_AGE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    return env


class Proc:
    """A child process of the test (worker, scheduler, daphne) with its log in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        wait_for(lambda: text in self.log() or self._died(), timeout=timeout, what=f"{self.name}: {text!r}")
        if text not in self.log():
            raise AssertionError(f"{self.name} exited early:\n{self.log()[-3000:]}")

    def _died(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker and its pool children)."""
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=15)


class Processes:
    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def worker(self, *, concurrency: int = 1, name: str | None = None, pool: str = "prefork", **env: str) -> Proc:
        name = name or f"worker{len(self.procs)}"
        proc = Proc(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "dexweb",
                "worker",
                "-l",
                "info",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-Q",
                self.env["DEX_DEFAULT_QUEUE"],
                "-n",
                f"{name}-{SESSION}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            {**self.env, **env},
            self.log_dir,
        ).start()
        self.procs.append(proc)
        proc.wait_for_log("ready.")
        return proc

    def scheduler(self, *, name: str | None = None, **env: str) -> Proc:
        name = name or f"scheduler{len(self.procs)}"
        proc = Proc(name, [sys.executable, "manage.py", "scheduler"], {**self.env, **env}, self.log_dir).start()
        self.procs.append(proc)
        proc.wait_for_log("scheduler started")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.purge()

    def purge(self) -> None:
        """Drop the wake-ups a test leaves in the broker (duplicates its runs no longer need): the next test's
        worker must not work through them before reaching its own."""
        from dexweb.celery import app

        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(self.env["DEX_DEFAULT_QUEUE"])


@pytest.fixture
def processes(dex_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    """Start real worker / scheduler processes for a test; all are stopped when it ends."""
    procs = Processes(dex_env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


# --- personas (DESIGN §6: viewers read, operators act; admin is staff) --------------------------------------


def persona(role: str, *, username: str | None = None) -> Any:
    """A user in the role's group ("viewer", "operator"), or a superuser for "admin"."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from runs.ops.audit import roles_ensure

    users = get_user_model().objects
    name = username or role
    if role == "admin":
        return users.create_superuser(name, email=f"{name}@example.com", password=f"pw-{name}-123")
    user = users.create_user(name, password=f"pw-{name}-123")
    roles_ensure()  # a transactional test before this one flushed the groups the migration made
    user.groups.add(Group.objects.get(name=role))
    return user


def logged_in(user: Any) -> Any:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator_user(db: None) -> Any:
    return persona("operator")


@pytest.fixture
def viewer(db: None) -> Any:
    return logged_in(persona("viewer"))


@pytest.fixture
def operator(operator_user: Any) -> Any:
    return logged_in(operator_user)


@pytest.fixture
def admin(db: None) -> Any:
    return logged_in(persona("admin"))
