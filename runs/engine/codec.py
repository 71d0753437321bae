"""Encoding step and run outputs as the JSON Postgres stores."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from django.conf import settings

from runs.engine.errors import StepOutputError

log = logging.getLogger(__name__)

# --- encoding ----------------------------------------------------------------------------------------------


def json_default(value: Any) -> Any:
    import pydantic

    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"a value of type {type(value).__name__} is not JSON-serialisable")


def encode_output(value: Any, *, what: str) -> str:
    """JSON text for a step or run output, or StepOutputError naming `what` (e.g. "step 'plan'")."""
    try:
        text = json.dumps(value, default=json_default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StepOutputError(f"{what} returned a value that can't be stored as JSON: {exc}") from None
    if "\\u0000" in text:
        raise StepOutputError(f"{what} returned text containing a NUL character, which Postgres can't store")
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800", e.g. from a JSON escape or an undecodable file name): no UTF-8 database
        # holds it, and finding out at the INSERT would crash the worker instead of failing the step.
        raise StepOutputError(
            f"{what} returned text that isn't valid Unicode (a lone surrogate), which Postgres can't store"
        ) from None
    limit = settings.DEX_MAX_STEP_OUTPUT_BYTES
    size = len(encoded)
    if size > limit:
        raise StepOutputError(f"{what} returned {size:,} bytes of JSON, over the limit of {limit:,} bytes")
    return text


def now() -> datetime:
    return datetime.now(UTC)
