"""The identity of an LLM request: what the response cache and step memoisation key on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

HASH_VERSION = 1  # part of what is hashed: bump it when the canonical form changes, so old keys can't collide

# How the answer is delivered or how long we wait for it, not what the answer is.
TRANSPORT_PARAMS = frozenset({"stream", "stream_options", "timeout", "extra_headers", "extra_query", "extra_body"})


def request_hash(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """sha256 (hex) of the request's canonical JSON: sorted keys, no whitespace, UTF-8.

    Equal requests hash equal whatever the key order of their dicts or tuple-vs-list; `tools=None` and
    `tools=[]` are the same request; transport-only params (`stream`, `timeout`, ...) are left out. A value
    that isn't JSON (a datetime, an object) is a TypeError, not a silently unstable key.
    """
    canonical = {
        "v": HASH_VERSION,
        "model": model,
        "messages": list(messages),
        "params": {k: v for k, v in (params or {}).items() if k not in TRANSPORT_PARAMS},
        "tools": list(tools or []),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
