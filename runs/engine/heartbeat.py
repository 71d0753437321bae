"""The heartbeat: one thread per worker process renewing the leases of the runs executing in it."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import DatabaseError, connection

from runs.engine.lease import LEASE_EXTEND, fenced_write

if TYPE_CHECKING:
    from runs.engine.context import RunContext

log = logging.getLogger(__name__)

# --- heartbeat ---------------------------------------------------------------------------------------------


class _Heartbeats:
    """One thread per worker process renews the lease of every run executing in it, every lease/3, on its
    own database connection; flushes their buffered logs and metadata; and notices cancel requests, lost
    leases and exhausted max_durations. Registering a run is a set insert: no thread per run."""

    def __init__(self) -> None:
        self._runs: set[RunContext] = set()
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, ctx: RunContext) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (or a forked pool child)
                self._runs = set()
                threading.Thread(target=self._loop, name="dex-heartbeat", daemon=True).start()
                self._pid = os.getpid()
            self._runs.add(ctx)

    def remove(self, ctx: RunContext) -> None:
        with self._lock:
            self._runs.discard(ctx)

    def _loop(self) -> None:
        while True:
            time.sleep(settings.DEX_LEASE_SECONDS / 3)
            with self._lock:
                runs = list(self._runs)
            for ctx in runs:
                self._beat(ctx)

    def _beat(self, ctx: RunContext) -> None:
        try:
            written = fenced_write(ctx._claim, ctx._buffer, run_set=LEASE_EXTEND)
        except DatabaseError:
            log.warning("heartbeat for run %s failed; retrying", ctx.run_id, exc_info=True)
            connection.close()
            return
        if written is None:
            ctx._lease_lost = True
            self.remove(ctx)
            return
        if written.cancel_requested:
            ctx._cancel_requested = True
        remaining = ctx._remaining()
        if remaining is not None and remaining <= 0:
            ctx._timed_out = True


heartbeats = _Heartbeats()
