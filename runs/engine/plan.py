"""A step about to run: its key, position, attempt and budget (StepPlan), and its row as the fenced statement
writes it (step_row)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runs.engine.codec import now
from runs.sdk import Retry


@dataclass
class StepPlan:
    key: str
    seq: int
    kind: str
    attempt: int
    budget_used: int
    retry: Retry
    timeout: float | None
    started: datetime = field(default_factory=now)
    memoized: bool = False
    output: Any = None
    # Attempts whose worker died under them, recorded with this attempt's row ("worker lost").
    lost: list[dict] = field(default_factory=list)


NO_RETRY = Retry(attempts=1)


def step_row(
    plan: StepPlan,
    *,
    status: str,
    finished: datetime | None,
    output: str | None = None,
    error: str | None = None,
    history: str | None = None,
    wake_at: datetime | None = None,
    meta: dict | None = None,
) -> dict:
    return {
        "s_seq": plan.seq,
        "s_key": plan.key,
        "s_kind": plan.kind,
        "s_status": status,
        "s_attempts": plan.attempt,
        "s_budget": plan.budget_used,
        "s_output": output,
        "s_error": error,
        "s_history": history if history is not None else json.dumps(plan.lost),
        "s_started": plan.started,
        "s_finished": finished,
        "s_wake_at": wake_at,
        "s_meta": json.dumps(meta or {}),
    }
