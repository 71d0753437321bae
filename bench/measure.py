"""Measuring instruments for the benchmarks: the log line, the load average, Postgres's counters (the
transaction-id counter, pg_stat_wal, COMMIT records in the WAL) and per-process CPU seconds from /proc."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> dict:
    """`uptime`'s line and the 1/5/15-minute load averages, to print beside timings."""
    one, five, fifteen = os.getloadavg()
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        text = ""
    return {"uptime": text, "load": [round(one, 2), round(five, 2), round(fifteen, 2)]}


# --- Postgres counters ------------------------------------------------------------------------------------------


class Probe:
    """A side connection (to the server's `postgres` database, so it adds nothing to the bench databases'
    counters) that reads the cluster's transaction-id counter, pg_stat_wal and per-database counters."""

    def __init__(self, url: str):
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.version = self.conn.info.server_version

    def close(self) -> None:
        self.conn.close()

    def check_durable(self) -> None:
        fsync = self.conn.execute("SHOW fsync").fetchone()[0]
        sync = self.conn.execute("SHOW synchronous_commit").fetchone()[0]
        if fsync != "on" or sync != "on":
            raise RuntimeError(f"benchmarks need fsync and synchronous_commit on (have {fsync}, {sync})")

    def next_xid(self) -> int:
        """The next transaction id to be assigned (reading it assigns none, unlike pg_current_xact_id())."""
        return int(self.conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()[0])

    def wal_lsn(self) -> str:
        """The WAL insert position (an LSN, e.g. '0/1A2B3C8')."""
        return str(self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])

    def wal_bytes(self) -> int:
        """The WAL insert position, in bytes."""
        return int(
            self.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0]
        )

    def wal_sync(self) -> int | None:
        if self.version < 140000:
            return None
        return int(self.conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()[0])

    def xact_commit(self, database: str) -> int:
        row = self.conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", [database]).fetchone()
        return int(row[0]) if row else 0

    def backend_pids(self, databases: list[str]) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", [databases]
        ).fetchall()
        return [r[0] for r in rows]

    def describe(self) -> str:
        version = self.conn.execute("SHOW server_version").fetchone()[0]
        method = self.conn.execute("SHOW wal_sync_method").fetchone()[0]
        return f"Postgres {version} (fsync on, synchronous_commit on, wal_sync_method {method})"


class WalCommits:
    """Write commits counted where they are made durable: the COMMIT records in a stretch of the WAL, read
    with the server's own `pg_waldump`. A write transaction writes exactly one (its savepoints' subtransactions
    none of their own, read-only transactions none), so unlike the transaction-id counter, which also counts
    subtransaction ids, this is the number of commits a run made. Needs the server's WAL on this machine."""

    def __init__(self, probe: Probe, binary: str, wal_dir: Path):
        self.probe = probe
        self.binary = binary
        self.wal_dir = wal_dir

    @classmethod
    def create(cls, probe: Probe) -> WalCommits | None:
        major = probe.version // 10000
        try:
            data_dir = Path(probe.conn.execute("SHOW data_directory").fetchone()[0])
        except Exception:  # not a superuser, or not this machine's server
            return None
        wal_dir = data_dir / "pg_wal"
        binary = _pg_binary("pg_waldump", major)
        if binary is None or not wal_dir.is_dir():
            return None
        return cls(probe, binary, wal_dir)

    def count(self, start: str, end: str) -> int | None:
        """COMMIT records written between two LSNs (None if pg_waldump couldn't read them)."""
        done = subprocess.run(
            [self.binary, "-p", str(self.wal_dir), "-s", start, "-e", end, "-r", "Transaction"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        commits = sum(1 for line in done.stdout.splitlines() if "desc: COMMIT " in line)
        if done.returncode != 0 and not done.stdout:
            log(f"pg_waldump could not read {start}..{end}: {done.stderr.strip()[-300:]}")
            return None
        return commits


def _pg_binary(name: str, major: int) -> str | None:
    """A Postgres tool of the server's major version: pgserver's (found without importing pgserver, which
    wants a runtime dir) or Debian's."""
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.origin:
        pginstall = Path(spec.origin).parent / "pginstall" / "bin"
        candidate = pginstall / name
        version = subprocess.run([str(pginstall / "postgres"), "--version"], capture_output=True, text=True)
        if candidate.exists() and re.search(rf"\b{major}\.", version.stdout):
            return str(candidate)
    candidate = Path(f"/usr/lib/postgresql/{major}/bin/{name}")
    return str(candidate) if candidate.exists() else None


def force_stats_flush(connection: Any) -> None:
    """Make the backend behind Django's `connection` publish its pending statistics now (PG ≥ 15), so
    pg_stat_wal / pg_stat_database read right after include its work."""
    if connection.pg_version >= 150000:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_stat_force_next_flush()")


# --- CPU --------------------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def ppid(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def pgrp(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[2]) if fields else None


def reaped_children_seconds(pid: int) -> float | None:
    fields = stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[13]) + int(fields[14])) / _CLK_TCK  # cutime + cstime


def cpu_seconds(pid: int) -> float | None:
    fields = stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime
