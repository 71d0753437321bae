"""Time-ordered UUIDs (RFC 9562 version 7): new rows land at the right edge of the primary-key index, and
ordering by id is ordering by creation time, which the run list's keyset pagination relies on.

Within one millisecond the 12-bit `rand_a` field is a counter (RFC 9562 §6.2, method 1), so ids a process
makes are strictly increasing; across processes, ids are ordered to the millisecond.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            # Start each millisecond's counter low and random, leaving room to count up.
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        else:
            ms = _last_ms  # the clock stepped back or stood still: stay monotonic
            _counter += 1
            if _counter > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
                _last_ms = ms = ms + 1
                _counter = 0
        counter = _counter
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def uuid7_floor(when: datetime) -> uuid.UUID:
    """The smallest uuid7 made at `when`: `id >= uuid7_floor(t)` is `created_at >= t` in the primary key's
    order, so a time window over runs can use the id indexes."""
    # Clamped to what 48 bits of milliseconds hold: a filter may name any year (before 1970 or after 10889).
    ms = min(max(int(when.timestamp() * 1000), 0), (1 << 48) - 1)
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62))
