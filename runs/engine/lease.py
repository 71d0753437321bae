"""Owning a run: the claim (one UPDATE with a fencing token) and the fenced statement behind every write a
worker makes for the run it owns."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError

from runs.engine import versions
from runs.engine.codec import json_default, now
from runs.engine.flow import claim_next
from runs.engine.sql import hot_cursor
from runs.sdk.registry import registry

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- claim ---------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    run_id: UUID
    task_id: str
    payload: dict
    token: int
    worker: str
    cancel_requested: bool
    executed_seconds: float
    executions: int
    # False only on a run's first execution that isn't a fork: no step can be recorded yet.
    may_have_steps: bool = True
    cost_usd: Decimal = Decimal(0)  # LLM spend recorded so far
    budget_usd: Decimal | None = None  # the run's own cap (an approved "continue?"), over the task's
    started_at: datetime | None = None
    created_at: datetime | None = None
    code_version: str = ""
    # The step an earlier execution was executing when it was last seen (heartbeat), if any.
    inflight: dict | None = None
    # Postgres's clock minus this machine's at the claim: deadlines are written in Postgres's time.
    clock_offset: timedelta = timedelta(0)
    claimed_monotonic: float = field(default_factory=time.monotonic)

    def now(self) -> datetime:
        """The time in Postgres's clock (the scheduler compares deadlines with its now())."""
        return now() + self.clock_offset


# What a claim sets and returns: shared by the plain claim below and flow.claim_next. Every execution records
# the version of the code executing it when it differs from the previous one; the first is the run's version.
_VERSION = "coalesce(%(versions)s::jsonb ->> task_id, %(version)s)"
CLAIM_SET = f"""status = 'running', lease_owner = %(worker)s, lease_token = lease_token + 1,
         lease_expires_at = statement_timestamp() + make_interval(secs => %(lease)s),
         claimed_at = statement_timestamp(), started_at = coalesce(started_at, statement_timestamp()),
         executions = executions + 1, wake_at = NULL, status_reason = '', resends = 0,
         lease_backend_pid = CASE WHEN %(track_backend)s THEN pg_backend_pid() END,
         code_version = CASE WHEN code_version = '' THEN {_VERSION} ELSE code_version END,
         execution_versions = CASE
           WHEN execution_versions -> -1 ->> 'version' IS DISTINCT FROM {_VERSION}
           THEN execution_versions || jsonb_build_array(jsonb_build_object(
                  'execution', executions + 1, 'version', {_VERSION}, 'at', statement_timestamp()))
           ELSE execution_versions END"""
CLAIM_RETURNING = """task_id, payload, lease_token, cancel_requested_at IS NOT NULL, executed_seconds, executions,
          replay_of_id IS NOT NULL, cost_usd, budget_usd, started_at, created_at, code_version, inflight,
          statement_timestamp()"""

# A run without flow-control limits is claimed by the UPDATE. A limited one (runs/engine/flow.py) is not: the
# second branch hands back its group (task and keys) for claim_next, still in one round trip.
_CLAIM_SQL = f"""
WITH claimed AS (
  UPDATE runs_run SET {CLAIM_SET}
   WHERE id = %(run)s AND status = 'queued' AND concurrency_key_value IS NULL AND rate_key_value IS NULL
  RETURNING {CLAIM_RETURNING})
SELECT true, NULL::text, NULL::text, * FROM claimed
UNION ALL
SELECT false, concurrency_key_value, rate_key_value, task_id, NULL::jsonb, NULL::bigint, NULL::bool,
       NULL::float, NULL::int, NULL::bool, NULL::numeric, NULL::numeric, NULL::timestamptz, NULL::timestamptz,
       NULL::text, NULL::jsonb, NULL::timestamptz
  FROM runs_run
 WHERE id = %(run)s AND status IN ('queued', 'running')
   AND (concurrency_key_value IS NOT NULL OR rate_key_value IS NOT NULL)
"""


def claim_params(run_id: UUID | str, worker: str) -> dict[str, Any]:
    return {
        "run": str(run_id),
        "worker": worker,
        "lease": settings.DEX_LEASE_SECONDS,
        # Behind a transaction-mode pooler a backend is not this process's own: no death detection by session.
        "track_backend": settings.DEX_DB_POOLER != "transaction",
        "versions": json.dumps(versions.task_versions()),
        "version": versions.deploy_version(),
    }


def run_claim(run_id: UUID | str, *, worker: str) -> Claim | None:
    """Take ownership of a queued run with one statement; None if it isn't ours to run (finished, owned by
    another live worker, parked). A run whose worker died is re-queued by the scheduler first.

    A run of a task with concurrency / rate limits takes a second, locked statement (claim_next), which
    may claim a better run of the same group instead — or none, leaving them queued, when a limit is reached.
    """
    params = claim_params(run_id, worker)
    with hot_cursor() as cur:
        cur.execute(_CLAIM_SQL, params)
        row = cur.fetchone()
    if row is None:
        return None
    claimed, ckey, rkey, *row = row
    if not claimed:
        task_id = row[0]
        task = registry.get(task_id) if task_id in registry else None
        row = claim_next(
            run_id=run_id,
            task_id=task_id,
            ckey=ckey,
            rkey=rkey,
            task=task,
            params=params,
            claim_set=CLAIM_SET,
            returning=CLAIM_RETURNING,
        )
        if row is None:
            return None
        run_id, *row = row
    (task_id, payload, token, cancel_requested, executed, executions, is_replay, cost, budget, started_at,
     created_at, code_version, inflight, db_now) = row  # fmt: skip
    if isinstance(payload, str):
        payload = json.loads(payload)
    return Claim(
        run_id=UUID(str(run_id)),
        task_id=task_id,
        payload=payload,
        token=token,
        worker=worker,
        cancel_requested=cancel_requested,
        executed_seconds=executed,
        executions=executions,
        may_have_steps=executions > 1 or is_replay,
        cost_usd=cost,
        budget_usd=budget,
        started_at=started_at,
        created_at=created_at,
        code_version=code_version,
        inflight=json.loads(inflight) if isinstance(inflight, str) else inflight,
        clock_offset=db_now - now(),
    )


# --- the fenced writes of a worker ---------------------------------------------------------------------------

LEASE_EXTEND = "lease_expires_at = now() + make_interval(secs => %(lease)s)"

_LOGS_CTE = """,
logs AS (
  INSERT INTO runs_logline (run_id, step_key, ts, level, message, origin)
  SELECT lease.id, x.step_key, x.ts, x.level, x.message, x.origin
    FROM lease, jsonb_to_recordset(%(logs)s::jsonb)
         AS x(step_key text, ts timestamptz, level text, message text, origin text)
  -- A line of agent code outside steps is stored once per run, however often the code re-runs (context.py).
  ON CONFLICT (run_id, origin) WHERE origin IS NOT NULL DO NOTHING)"""

_STEP_CTE = """,
step AS (
  INSERT INTO runs_step (run_id, seq, key, kind, status, attempts, budget_used, output, error, history,
                         started_at, finished_at, wake_at, meta)
  -- Typed explicitly: parameters are bound on the server (sql.py), and a NULL has no type of its own.
  SELECT lease.id, %(s_seq)s::int, %(s_key)s::text, %(s_kind)s::text, %(s_status)s::text, %(s_attempts)s::int,
         %(s_budget)s::int, %(s_output)s::jsonb, %(s_error)s::jsonb, %(s_history)s::jsonb, %(s_started)s::timestamptz,
         %(s_finished)s::timestamptz, %(s_wake_at)s::timestamptz, %(s_meta)s::jsonb
    FROM lease
  ON CONFLICT (run_id, key) DO UPDATE
     SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, budget_used = EXCLUDED.budget_used,
         output = EXCLUDED.output, error = EXCLUDED.error, history = runs_step.history || EXCLUDED.history,
         -- A wait keeps the time it began; an attempt after a failure has its own start (history has all).
         started_at = CASE WHEN runs_step.status = 'waiting' THEN runs_step.started_at
                           ELSE EXCLUDED.started_at END,
         finished_at = EXCLUDED.finished_at, wake_at = EXCLUDED.wake_at,
         meta = runs_step.meta || EXCLUDED.meta
   WHERE runs_step.status <> 'completed'
  RETURNING id)"""


@dataclass
class StepRecord:
    seq: int
    key: str
    kind: str
    status: str
    attempts: int
    budget_used: int
    output: Any
    meta: dict
    error: dict | None = None
    # A sleep's wake-up, a retry's next attempt, a wait's timeout: recorded when the wait began (DESIGN §3).
    wake_at: datetime | None = None


class Buffer:
    """Log lines and metadata waiting for the next write (a step's commit, a heartbeat, the settle)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logs: list[dict] = []
        self.metadata: dict[str, Any] = {}

    def take(self) -> tuple[list[dict], dict]:
        with self.lock:
            logs, self.logs = self.logs, []
            metadata, self.metadata = self.metadata, {}
        return logs, metadata

    def put_back(self, logs: list[dict], metadata: dict) -> None:
        with self.lock:
            self.logs[:0] = logs
            self.metadata = {**metadata, **self.metadata}


@dataclass
class Written:
    cancel_requested: bool
    queue: str
    priority: int
    parent_id: UUID | None
    step_written: bool
    # The run's concurrency group (flow control); None for a task without a concurrency limit.
    concurrency_key: str | None = None
    # What the live header shows, as the statement left the run.
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cost_usd: Decimal = Decimal(0)
    code_version: str = ""
    # The id of the step row the statement wrote, if any.
    step_id: int | None = None


def fenced_write(
    claim: Claim,
    buffer: Buffer,
    *,
    run_set: str | None = None,
    params: dict | None = None,
    step: dict | None = None,
    cost: Decimal | None = None,
    saved: Decimal | None = None,
) -> Written | None:
    """The one statement behind every worker write: *only if we still hold the run's lease* (token +
    running), update the run as `run_set` says (or just lock it), and in the same statement flush buffered
    log lines and metadata and upsert `step`. None if the lease was lost (then nothing was written)."""
    logs, metadata = buffer.take()
    values: dict[str, Any] = {
        "run": str(claim.run_id),
        "token": claim.token,
        "lease": settings.DEX_LEASE_SECONDS,
        **(params or {}),
    }
    if metadata:
        run_set = (run_set or LEASE_EXTEND) + ", metadata = metadata || %(metadata)s::jsonb"
        values["metadata"] = json.dumps(metadata, default=json_default)
    if cost:  # an LLM step's spend lands on the run in the step's own statement
        run_set = (run_set or LEASE_EXTEND) + ", cost_usd = cost_usd + %(cost)s"
        values["cost"] = cost
    if saved:
        run_set = (run_set or LEASE_EXTEND) + ", saved_usd = saved_usd + %(saved)s"
        values["saved"] = saved
    owned = "id = %(run)s AND lease_token = %(token)s AND status = 'running'"
    columns = (
        "id, cancel_requested_at, queue, priority, parent_id, concurrency_key_value, started_at, finished_at, "
        "cost_usd, code_version"
    )
    if run_set is None:
        # A step's commit only has to prove the lease (the heartbeat extends it): lock the run row against a
        # concurrent claim instead of updating it, which spares a new row version and its index entries.
        lease = f"SELECT {columns} FROM runs_run WHERE {owned} FOR NO KEY UPDATE"
    else:
        lease = f"UPDATE runs_run SET {run_set} WHERE {owned} RETURNING {columns}"
    sql = f"WITH lease AS ({lease})"
    if logs:
        sql += _LOGS_CTE
        values["logs"] = json.dumps(logs)
    if step is not None:
        sql += _STEP_CTE
        values.update(step)
    # The step row's id (None if not written): the live views name the row by it (runs.realtime).
    written = "(SELECT max(id) FROM step)" if step is not None else "NULL::bigint"
    sql += (
        f"\nSELECT cancel_requested_at IS NOT NULL, queue, priority, parent_id, {written}, concurrency_key_value,"
        " started_at, finished_at, cost_usd, code_version FROM lease"
    )
    try:
        with hot_cursor() as cur:
            cur.execute(sql, values)
            row = cur.fetchone()
    except DatabaseError:
        buffer.put_back(logs, metadata)
        raise
    if row is None:
        return None
    result = Written(bool(row[0]), row[1], row[2], row[3], row[4] is not None, *row[5:], step_id=row[4])
    if step is not None and not result.step_written:
        # The step is already completed under this very token: only a reused token could do that.
        return None
    return result
