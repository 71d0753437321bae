"""A worker behind PgBouncer in transaction mode (README "Deploy"). PgBouncer before 1.21 can't carry
protocol-level prepared statements in that mode, and a backend is not a process's own, so `DEX_DB_POOLER=
transaction` turns both the prepared hot statements and dead-worker detection by Postgres session off; runs must
still complete, park and resume."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from django.db import connection

from runs import services
from runs.models import RunStatus
from tests.agents import ledger_lines
from tests.conftest import Processes, wait_for
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pgbouncer(dex_env: dict[str, str]) -> Iterator[str]:
    """PgBouncer in transaction mode in front of the test database; yields the DATABASE_URL through it."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (.ci/run installs Debian's)")
    settings_dict = connection.settings_dict
    host, port = settings_dict["HOST"] or "127.0.0.1", settings_dict["PORT"] or "5432"
    user, dbname = settings_dict["USER"] or "postgres", settings_dict["NAME"]
    # Its own world-readable directory: pgbouncer refuses to run as root, and the user it runs as must read it.
    workdir = Path(tempfile.mkdtemp(prefix="dex-pgbouncer-"))
    workdir.chmod(0o755)
    listen = free_port()
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"{dbname} = host={host} port={port} dbname={dbname} user={user}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {listen}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {workdir / 'users.txt'}",
                "pool_mode = transaction",
                "default_pool_size = 4",
                "max_client_conn = 200",
                "ignore_startup_parameters = extra_float_digits,options",
            ]
        )
        + "\n"
    )
    for path in workdir.iterdir():
        path.chmod(0o666)
    args = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # The owner of the Postgres socket's directory can reach it (the embedded server's is private to it).
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
        args[1:1] = ["-u", owner]
    log = workdir / "pgbouncer.log"
    with open(log, "wb") as out:  # opened here: the user pgbouncer runs as may not write in workdir
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(listen) or proc.poll() is not None, what="pgbouncer to listen")
        assert proc.poll() is None, log.read_text()
        yield f"postgresql://{user}@127.0.0.1:{listen}/{dbname}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_worker_and_scheduler_through_pgbouncer_in_transaction_mode_run_park_and_resume(
    processes: Processes, pgbouncer: str, tmp_path: Path
) -> None:
    env: dict[str, Any] = {"DATABASE_URL": pgbouncer, "DEX_DB_POOLER": "transaction"}
    assert urlparse(pgbouncer).port  # through the pooler, not the server's socket
    processes.worker(concurrency=2, **env)
    processes.scheduler(**env)
    steps = tmp_path / "steps"
    flaky = tmp_path / "flaky"
    sleeper = tmp_path / "sleeper"
    runs = [
        services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(steps)})[0],
        services.run_trigger(task_id="t-flaky", payload={"ledger": str(flaky), "failures": 2})[0],
        services.run_trigger(task_id="t-sleep", payload={"ledger": str(sleeper), "seconds": 0.5})[0],
    ]
    for run in runs:
        finished(run, timeout=60)
        assert run.status == RunStatus.COMPLETED, run.error
    assert ledger_lines(steps) == [f"s{i}" for i in range(1, 11)]
    assert ledger_lines(flaky) == ["before", "flaky attempt 1", "flaky attempt 2", "flaky attempt 3", "after"]
    assert ledger_lines(sleeper) == ["before", "after"]
