"""Text Postgres can't store: NUL characters (text and jsonb refuse `\\u0000`) and lone surrogates (a JSON
`"\\ud800"` escape, or a command-line argument that wasn't valid UTF-8, decodes to one; no UTF-8 database can
hold it). Every place text enters Dex — API bodies and paths, dashboard forms, schedule payloads, CLI
arguments — refuses it with a message naming where, instead of failing later as a database error (a 500).
"""

from __future__ import annotations

from typing import Any

NUL_MESSAGE = "text can't contain NUL (\\u0000) characters"
SURROGATE_MESSAGE = "text must be valid Unicode (no lone surrogates)"


def unstorable_reason(text: str) -> str | None:
    """Why Postgres can't store `text`, or None."""
    if "\x00" in text:
        return NUL_MESSAGE
    try:
        text.encode()
    except UnicodeEncodeError:
        return SURROGATE_MESSAGE
    return None


def find_unstorable(value: Any, loc: list[str | int] | None = None) -> tuple[list[str | int], str] | None:
    """The location and reason of the first string (or object key) in a JSON-like `value` that Postgres can't
    store, else None."""
    loc = list(loc or [])
    if isinstance(value, str):
        reason = unstorable_reason(value)
        return (loc, reason) if reason else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = (find_unstorable(key, loc) if isinstance(key, str) else None) or find_unstorable(item, [*loc, key])
        if found:
            return found
    return None


def describe(found: tuple[list[str | int], str]) -> str:
    """`payload.items.0: text can't contain NUL…` for a message."""
    loc, reason = found
    return f"{'.'.join(str(p) for p in loc)}: {reason}" if loc else reason


def storable(text: str) -> str:
    """`text` with what Postgres can't store made visible instead: NUL as `\\x00`, a lone surrogate as U+FFFD.
    For text Dex writes itself (an error message, a log line), which must be stored, not refused."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def unstorable_option(options: dict[str, Any]) -> str | None:
    """For a management command: `--name: text can't contain…` for the first option (string, or list of
    strings) Postgres can't store, else None. A NUL arrives through call_command; a lone surrogate from an
    argument that wasn't valid UTF-8 (Python decodes argv with surrogateescape)."""
    for name, value in options.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            reason = unstorable_reason(item) if isinstance(item, str) else None
            if reason:
                return f"--{name.replace('_', '-')}: {reason}"
    return None
