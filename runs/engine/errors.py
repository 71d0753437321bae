"""The engine's control-flow signals and how an exception is recorded."""

from __future__ import annotations

import logging
import traceback

from runs.redact import redact
from runs.sdk import Cancelled, NonRetriableError
from runs.text import storable

log = logging.getLogger(__name__)

# --- control flow -----------------------------------------------------------------------------------------
# BaseExceptions, so an agent's `except Exception:` can't swallow them on their way up to run_execute.


class Parked(BaseException):
    """The run was parked (sleep, wait, retry back-off); the worker returns and holds nothing."""


class LeaseLost(Cancelled):
    """Another worker owns the run now (or it was finished under us): stop without writing anything."""


class RunTimedOut(BaseException):
    """The run used up its max_duration."""


class StepFailedForGood(BaseException):
    """A step failed with no retries left (or non-retriably); the run fails with `error`."""

    def __init__(self, error: dict):
        super().__init__(error.get("message", ""))
        self.error = error


class StepOutputError(NonRetriableError):
    """A step returned something Dex can't store (not JSON, too large)."""


def error_info(exc: BaseException, *, step: str | None = None) -> dict:
    message = str(exc) or type(exc).__name__
    # Redacted before it is stored: an exception may quote a key, a password or a bearer token.
    # storable: an exception may quote a NUL or a lone surrogate, which would fail the very write that records it.
    info = {
        "type": type(exc).__name__,
        "message": storable(redact(message)),
        "traceback": storable(redact("".join(traceback.format_exception(exc)))),
    }
    if step is not None:
        info["step"] = step
    return info
