"""Structured logs: `DEX_LOG_FORMAT=json` makes every process (web, worker, scheduler) write one JSON object a
line, with `run_id`, `task` and `step` when the line was logged inside a run — so a log pipeline can join a
worker's lines to the run in the dashboard."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has: anything else on a record came from `extra=` and is worth keeping.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _run_scope() -> dict[str, str]:
    """The run and step being executed by this thread, if any (the engine's context variable)."""
    context = sys.modules.get("runs.engine.context")  # never import the engine from a formatter: apps may not be ready
    if context is None:
        return {}
    scope = context.current_scope.get()
    if scope is None:
        return {}
    ctx, step_key = scope
    fields = {"run_id": str(ctx.run_id), "task": ctx.task_id}
    if step_key:
        fields["step"] = step_key
    return fields


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "run_id"?, "task"?, "step"?, "exc"?, ...extra}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_run_scope())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
