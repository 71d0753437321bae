"""`manage.py dev` end to end: a real `manage.py dev` with its own data directory, so it starts (and must stop)
its own embedded Postgres and Redis. One dev process serves the module's tests, in order: it serves the login
page and prints the dev login, a killed worker is restarted, an embedded Redis or Postgres that dies is started
again, and Ctrl-C leaves nothing running. A second one, on the same data directory, is SIGKILLed: its children
must not outlive it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, wait_for

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Dev:
    popen: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, *, timeout: float = 60, after: int = 0) -> re.Match:
        def found() -> re.Match | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"manage.py dev exited with {self.popen.returncode}:\n{self.log()[-5000:]}")
            return re.compile(pattern, re.M).search(self.log(), after)

        try:
            return wait_for(found, timeout=timeout, interval=0.1, what=f"dev log: {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- dev log ---\n{self.log()[-5000:]}") from None

    def child_pid(self, name: str, *, after: int = 0) -> tuple[int, int]:
        """The pid of the latest start of child `name` logged after offset `after`, and where it was logged."""
        match = self.wait_for_log(rf"^{name} +\| started \(pid (\d+)\)$", after=after)
        return int(match.group(1)), match.end()


def dev_env(data_dir: Path) -> dict[str, str]:
    # Its own data directory and nothing of this test session's servers: it starts its own embedded ones.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "XDG_RUNTIME_DIR", "DEX_TEST_DATABASE")
    }
    env.update(DEX_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def dev_start(data_dir: Path, log_name: str = "dev.log") -> Dev:
    port = free_port()
    log_path = data_dir / log_name
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "manage.py", "dev", "--port", str(port), "--workers", "1"],
            cwd=ROOT,
            env=dev_env(data_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Dev(popen, port, data_dir, log_path)


def embedded_stop(data_dir: Path) -> None:
    """Leave no embedded server of this data directory running."""
    if (data_dir / "pg" / "postmaster.pid").exists() or (data_dir / "redis" / "redis.sock").exists():
        subprocess.run(
            [sys.executable, "manage.py", "embedded", "stop"], cwd=ROOT, env=dev_env(data_dir), capture_output=True
        )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    data_dir = tmp_path_factory.mktemp("dexdev")
    dev = dev_start(data_dir)
    popen = dev.popen
    try:
        yield dev
    finally:
        if popen.poll() is None:  # a test failed before the stop test: stop it the way a user would
            tree = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for proc in tree:
                    proc.kill()
        embedded_stop(data_dir)  # whatever happened


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return None


def still_running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie has exited; reaping it is its parent's business
    except psutil.NoSuchProcess:
        return False


def test_it_prints_the_dev_login_and_serves_the_login_page(dev: Dev):
    match = dev.wait_for_log(r"^Dev login: admin / (\S+)$")
    assert (dev.data_dir / "dev-login.txt").read_text().strip() == match.group(1)
    assert f"http://127.0.0.1:{dev.port}/" in dev.log()
    url = f"http://127.0.0.1:{dev.port}/login/"
    wait_for(lambda: http_status(url) == 200, timeout=60, interval=0.2, what=f"200 from {url}")


def test_it_restarts_the_worker_when_it_is_killed(dev: Dev):
    pid, offset = dev.child_pid("worker")
    dev.wait_for_log(r"^worker +\| .*ready\.$", after=offset)
    os.kill(pid, signal.SIGKILL)
    dev.wait_for_log(r"^worker +\| killed by SIGKILL after [\d.]+s; restarting in \d+s$", after=offset)
    new_pid, _ = dev.child_pid("worker", after=offset)
    assert new_pid != pid
    assert psutil.Process(new_pid).is_running()


def test_it_restarts_an_embedded_redis_or_postgres_that_dies(dev: Dev):
    url = f"http://127.0.0.1:{dev.port}/login/"
    wait_for(lambda: http_status(url) == 200, timeout=60, interval=0.2, what=f"200 from {url}")
    redis_pid = int((dev.data_dir / "redis" / "redis.pid").read_text().strip())
    offset = len(dev.log())
    os.kill(redis_pid, signal.SIGKILL)
    dev.wait_for_log(r"^redis +\| died; restarting it$", after=offset)
    dev.wait_for_log(r"^redis +\| restarted$", after=offset)
    assert int((dev.data_dir / "redis" / "redis.pid").read_text().strip()) != redis_pid

    postgres_pid = int((dev.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    offset = len(dev.log())
    os.kill(postgres_pid, signal.SIGKILL)
    dev.wait_for_log(r"^postgres +\| died; restarting it$", after=offset)
    dev.wait_for_log(r"^postgres +\| restarted$", after=offset)
    # The web process reconnects to the new server: the login page (a session read) is served again.
    wait_for(lambda: http_status(url) == 200, timeout=60, interval=0.2, what="the dashboard after the restarts")


def test_it_stops_everything_on_ctrl_c(dev: Dev):
    for name in ("web", "worker", "scheduler"):
        dev.child_pid(name)
    postgres_pid = int((dev.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    redis_pid = int((dev.data_dir / "redis" / "redis.pid").read_text().strip())
    tree = [psutil.Process(dev.popen.pid), *psutil.Process(dev.popen.pid).children(recursive=True)]
    tree += [psutil.Process(postgres_pid), *psutil.Process(postgres_pid).children(), psutil.Process(redis_pid)]

    dev.popen.send_signal(signal.SIGINT)
    assert dev.popen.wait(timeout=60) == 0, dev.log()[-5000:]

    _, alive = psutil.wait_procs(tree, timeout=5)
    left = [p for p in alive if still_running(p)]
    assert not left, f"still running after Ctrl-C: {left}"
    assert "stopped the embedded redis" in dev.log()
    assert "stopped the embedded postgres" in dev.log()


def test_its_children_do_not_outlive_it_when_it_is_sigkilled(dev: Dev):
    """A `manage.py dev` that is SIGKILLed can't stop its children: the kernel does (PR_SET_PDEATHSIG)."""
    assert dev.popen.poll() is not None  # the module's dev was stopped by the test above; reuse its data
    killed = dev_start(dev.data_dir, "killed-dev.log")
    try:
        for name in ("web", "worker", "scheduler"):
            killed.child_pid(name)
        killed.wait_for_log(r"^worker +\| .*ready\.$")
        children = psutil.Process(killed.popen.pid).children(recursive=True)
        assert len(children) >= 4  # web, worker (+ its pool), scheduler, llm

        killed.popen.kill()
        killed.popen.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=15)
        left = [p for p in alive if still_running(p)]
        assert not left, f"still running after manage.py dev was SIGKILLed: {left}"
    finally:
        embedded_stop(dev.data_dir)
