"""The heartbeat: one thread per worker process renewing the leases of the runs executing in it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import DatabaseError, connection

from runs.engine.codec import now
from runs.engine.lease import LEASE_EXTEND, fenced_write

if TYPE_CHECKING:
    from runs.engine.context import RunContext

log = logging.getLogger(__name__)

# --- heartbeat ---------------------------------------------------------------------------------------------


@dataclass
class _Beat:
    last: float = field(default_factory=time.monotonic)
    inflight: dict | None = None  # the in-flight step the heartbeat last wrote


class _Heartbeats:
    """One thread per worker process renews the lease of every run executing in it, every lease/3, on its
    own database connection; flushes their buffered logs and metadata; records the step in flight once it has
    run DEX_INFLIGHT_AFTER_SECONDS (a worker that dies under it then shows that attempt as lost: shorter
    steps are not recorded, which would cost a write per step); and notices cancel requests, lost leases and
    exhausted max_durations. Registering a run is a dict insert: no thread per run."""

    def __init__(self) -> None:
        self._runs: dict[RunContext, _Beat] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, ctx: RunContext) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (or a forked pool child)
                self._runs = {}
                threading.Thread(target=self._loop, name="dex-heartbeat", daemon=True).start()
                self._pid = os.getpid()
            self._runs[ctx] = _Beat()

    def remove(self, ctx: RunContext) -> None:
        with self._lock:
            self._runs.pop(ctx, None)

    def _loop(self) -> None:
        renew = settings.DEX_LEASE_SECONDS / 3
        inflight_after = settings.DEX_INFLIGHT_AFTER_SECONDS
        while True:
            time.sleep(min(renew, inflight_after / 2))
            with self._lock:
                runs = list(self._runs.items())
            for ctx, beat in runs:
                inflight = ctx.inflight
                unrecorded = inflight is not None and inflight != beat.inflight
                if time.monotonic() - beat.last >= renew or (unrecorded and _running_for(inflight) >= inflight_after):
                    self._beat(ctx, beat, inflight)

    def _beat(self, ctx: RunContext, beat: _Beat, inflight: dict | None) -> None:
        beat.last = time.monotonic()
        try:
            written = fenced_write(
                ctx._claim,
                ctx._buffer,
                run_set=LEASE_EXTEND + ", inflight = %(inflight)s::jsonb",
                params={"inflight": json.dumps(inflight) if inflight is not None else None},
            )
        except DatabaseError:
            log.warning("heartbeat for run %s failed; retrying", ctx.run_id, exc_info=True)
            connection.close()
            return
        if written is None:
            ctx._lease_lost = True
            self.remove(ctx)
            return
        beat.inflight = inflight
        if written.cancel_requested:
            ctx._cancel_requested = True
        remaining = ctx._remaining()
        if remaining is not None and remaining <= 0:
            ctx._timed_out = True


def _running_for(inflight: dict) -> float:
    started = datetime.fromisoformat(inflight["started_at"])
    return (now() - started).total_seconds()


heartbeats = _Heartbeats()
