"""Fixed-window rate limits in Redis, for the HTTP API: per API key, and per client IP for failed logins.

One round trip per check: a Lua script increments the window's counter, sets its expiry when it is new, and
answers (count, seconds left). Limits read "N/PERIOD", e.g. "600/60s", "10/m", "1000/1h" (settings
DEX_API_RATE_LIMIT and DEX_API_AUTH_FAILURE_LIMIT); "" or "off" disables one.

When Redis can't be reached the check lets the request through (and logs it): the API must keep accepting
triggers while Redis is down — Postgres is the record, the limiter only protects it.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# For each KEYS[i], ARGV[2i-1] is its window in seconds and ARGV[2i] '1' to count this hit or '0' to only read
# it. Answers {count, ttl} per key, in order.
_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local count
  if ARGV[2 * i] == '1' then
    count = redis.call('INCR', key)
    if count == 1 then redis.call('EXPIRE', key, tonumber(ARGV[2 * i - 1])) end
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  table.insert(out, count)
  table.insert(out, redis.call('TTL', key))
end
return out
"""


@dataclass(frozen=True)
class Limit:
    count: int
    period: int  # seconds


class RateLimited(Exception):
    """Over a limit: `retry_after` seconds until the window ends."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = max(1, retry_after)


def parse_limit(text: str | None) -> Limit | None:
    """ "600/60s" → Limit(600, 60); "" or "off" → None. ValueError for anything else."""
    if not text or text.strip().lower() in {"off", "none", "0"}:
        return None
    match = _LIMIT.match(text)
    if not match:
        raise ValueError(f"a rate limit reads like '600/60s' (N per period, unit s, m, h or d), not {text!r}")
    count, amount, unit = int(match[1]), int(match[2] or 1), match[3]
    if count < 1 or amount < 1:
        raise ValueError(f"a rate limit needs a count and a period of at least 1, not {text!r}")
    return Limit(count, amount * _UNIT_SECONDS[unit])


_client_lock = threading.Lock()
_client: tuple[str, Any] | None = None


def _script() -> Any:
    """The counting script, bound to a client of settings.REDIS_URL (EVALSHA: the script's text isn't sent
    with every request)."""
    global _client
    url = settings.REDIS_URL
    with _client_lock:
        if _client is None or _client[0] != url:
            # Short timeouts: a stuck Redis must not hold API requests (the check then fails open).
            # No retries either: redis-py's default (3, with back-off) would make every request of an outage
            # wait for them.
            client = redis.Redis.from_url(
                url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
            )
            _client = (url, client.register_script(_SCRIPT))
        return _client[1]


def _namespace() -> str:
    # Several Dex installations (or test databases) may share one Redis: each counts on its own.
    return f"{settings.DEX_RATE_LIMIT_PREFIX}:rl:{settings.DATABASES['default']['NAME']}"


@dataclass(frozen=True)
class Bucket:
    name: str
    limit: Limit
    count: bool = True  # False: read the bucket without counting this request


@dataclass(frozen=True)
class Window:
    hits: int
    retry_after: int


def hit(*buckets: Bucket) -> list[Window]:
    """Count (or read) each bucket in one round trip. Zero hits for all when Redis is unreachable."""
    if not buckets:
        return []
    keys = [f"{_namespace()}:{b.name}:{b.limit.period}" for b in buckets]
    args: list[int | str] = []
    for bucket in buckets:
        args += [bucket.limit.period, "1" if bucket.count else "0"]
    try:
        answer = _script()(keys=keys, args=args)
    except redis.RedisError as exc:
        log.warning("rate limit not checked (Redis unreachable): %s", exc)
        return [Window(0, 0) for _ in buckets]
    windows = []
    for i, bucket in enumerate(buckets):
        hits, ttl = int(answer[2 * i]), int(answer[2 * i + 1])
        windows.append(Window(hits, ttl if ttl > 0 else bucket.limit.period))
    return windows


def api_limit() -> Limit | None:
    return parse_limit(settings.DEX_API_RATE_LIMIT)


def auth_failure_limit() -> Limit | None:
    return parse_limit(settings.DEX_API_AUTH_FAILURE_LIMIT)
