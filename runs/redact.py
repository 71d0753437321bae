"""Secret redaction for what Dex stores about a step: its log lines, its error message and traceback.

A step that logs a request it made, or fails with an exception that quotes its client's configuration, must
not copy an API key into Postgres and onto the dashboard. Two nets, applied by runs.engine before a line or an
error is stored:

- shapes that are secrets whatever their context: Dex API keys (`dex_…`), OpenAI-style keys (`sk-…`),
  Anthropic / GitHub / Slack tokens, AWS access key ids, `Bearer <token>`, JWTs, the password of a URL
  (`postgres://user:PASSWORD@host`) and `password=… / api_key: … / token=…` assignments;
- the current *values* of environment variables and Django settings whose names contain KEY, SECRET, TOKEN,
  PASSWORD (or PASSWD, CREDENTIAL): a provider key configured as OPENAI_API_KEY is redacted wherever
  it appears, whatever it looks like.

Each match becomes `[redacted]`. Redaction is best effort, not a guarantee: a secret in a shape neither net
knows (split across lines, base64-encoded) gets through.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from django.conf import settings

REDACTED = "[redacted]"

# Names whose values are secrets.
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Values shorter than this aren't redacted by value: "1", "true" or "dex" would blank out ordinary text.
MIN_VALUE_LENGTH = 8
# Settings whose names match but whose values aren't secrets (a header name, a length...).
_NOT_SECRETS = frozenset({"AUTH_PASSWORD_VALIDATORS", "CSRF_HEADER_NAME"})

_PATTERNS = [
    # Dex API keys: "dex_" + token_urlsafe(32).
    re.compile(r"\bdex_[A-Za-z0-9_\-]{20,}"),
    # OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-...).
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    # GitHub tokens, Slack tokens, Google API keys.
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),
    # AWS access key ids.
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA)[A-Z0-9]{16}\b"),
    # JSON Web Tokens.
    re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
]
# Keep the part before the secret (group 1), replace the secret itself.
_KEEP_PREFIX = [
    # Authorization: Bearer <token> / Basic <base64>.
    re.compile(r"(\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/\-]{8,}=*", re.IGNORECASE),
    # scheme://user:password@host
    re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^\s:/@]*:)[^\s@/]+(?=@)", re.IGNORECASE),
    # password=..., "api_key": "...", secret: ..., aws_secret_access_key = ...
    re.compile(
        r"""((?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|secret[_-]?key|token|auth[_-]?token"""
        r"""|client[_-]?secret|private[_-]?key)["']?\s*[:=]\s*["']?)[^\s"',;&}]{3,}""",
        re.IGNORECASE,
    ),
]

# One pass for all the shapes.
_SHAPES = re.compile("|".join(f"(?:{p.pattern})" for p in _PATTERNS))
# A pattern of _KEEP_PREFIX only runs on text holding one of its keywords (lower case).
_KEEP_PREFIX_KEYWORDS = [
    ("bearer", "basic", "token"),
    ("://",),
    ("pass", "pwd", "secret", "key", "token"),
]

_values_lock = threading.Lock()
_values: tuple[float, re.Pattern[str] | None] = (0.0, None)
# Environment and settings are read again at most this often (a test or an operator may change them).
_VALUES_TTL = 5.0


def _secret_values() -> Iterable[str]:
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name):
            yield value
    for name in dir(settings):
        if name.isupper() and _SECRET_NAME.search(name) and name not in _NOT_SECRETS:
            value = getattr(settings, name, None)
            if isinstance(value, str):
                yield value


def _values_pattern() -> re.Pattern[str] | None:
    global _values
    now = time.monotonic()
    with _values_lock:
        if now - _values[0] < _VALUES_TTL:
            return _values[1]
    values = sorted({v for v in _secret_values() if len(v) >= MIN_VALUE_LENGTH}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None
    with _values_lock:
        _values = (now, pattern)
    return pattern


def forget_cached_values() -> None:
    """Read the environment and settings again on the next call (after changing them)."""
    global _values
    with _values_lock:
        _values = (0.0, None)


def redact(text: str) -> str:
    """`text` with every secret it appears to contain replaced by `[redacted]`."""
    if not text:
        return text
    values = _values_pattern()
    if values is not None:
        text = values.sub(REDACTED, text)
    text = _SHAPES.sub(REDACTED, text)
    lowered = text.lower()
    # Each of these scans the whole text at every position; most lines hold none of their keywords.
    for pattern, keywords in zip(_KEEP_PREFIX, _KEEP_PREFIX_KEYWORDS, strict=True):
        if any(keyword in lowered for keyword in keywords):
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_error(info: dict[str, Any]) -> dict[str, Any]:
    """An error dict (`{type, message, traceback, ...}`) with its message and traceback redacted."""
    return {k: redact(v) if k in ("message", "traceback") and isinstance(v, str) else v for k, v in info.items()}
