"""Run events: published after commit to Redis pub/sub channels of our own, read by the web processes.

Wire contract (documented in README "Live updates"; nothing here uses a channel layer's private names):

- channel `{DEX_CHANNEL_PREFIX}:run:{run_id}`: every event of one run (run page, SSE stream);
- channel `{DEX_CHANNEL_PREFIX}:runs`: the run-level events of every run (the run list);
- message: JSON `{"seq": n, "kind": "run"|"step"|"log"|"metadata"|"token", "run_id": "...", "data": {...}}`.
  `seq` numbers one run's events 1, 2, 3, ... in publish order (a Redis counter `{prefix}:seq:{run_id}`,
  incremented and published by one Lua script, so the numbers on a channel come in order): a subscriber that
  sees a hole lost an event and reads a snapshot from Postgres.
- `data` carries what changed, so a web process renders from the event alone: a step event its key, seq
  number, kind, status, attempt, times, wake_at, error, duration, output preview, usage, children and the
  step row's `id` once written (runs.engine.context `_step_event`); a run event its status and what the header
  shows (times, cost, code version, error, wake_at, steps completed) as far as the publisher knows them.

Sending happens on a background thread, so a worker's step never waits on Redis; pub/sub is at-most-once and
Postgres is the record, so a lost event only costs a subscriber a snapshot.

`publish_on_commit` is the default; `publish_now` is for code already past its commit (the engine's
autocommit statements) and says so in its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from django.db import transaction

log = logging.getLogger(__name__)

EventKind = Literal["run", "step", "log", "metadata", "token"]


@dataclass(frozen=True)
class RunEvent:
    """One change of a run: its status (`run`), a step starting or settling (`step`), a log line (`log`),
    metadata (`metadata`) or LLM tokens (`token`)."""

    kind: EventKind
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)

    # Set on the subscriber's side: the event's number in its run's sequence (1, 2, 3, ... per run).
    seq: int | None = None

    def body(self) -> str:
        """The JSON published (without `seq`, which Redis adds)."""
        return json.dumps({"kind": self.kind, "run_id": self.run_id, "data": self.data}, default=_json_default)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "run_id": self.run_id, "data": self.data}

    @classmethod
    def parse(cls, raw: bytes | str) -> RunEvent | None:
        """An event as published, or None for a message that isn't one (garbage on a shared Redis)."""
        try:
            value = json.loads(raw)
            return cls(value["kind"], str(value["run_id"]), value.get("data") or {}, seq=int(value["seq"]))
        except (ValueError, KeyError, TypeError):
            return None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # Decimal, UUID


# Tests (and the benchmark) capture events instead of, or besides, sending them.
_captures: list[list[RunEvent]] = []


@contextmanager
def capture() -> Iterator[list[RunEvent]]:
    events: list[RunEvent] = []
    _captures.append(events)
    try:
        yield events
    finally:
        _captures.remove(events)


# Redis Lua: number the event in its run's sequence and publish it, in one round trip and atomically, so the
# numbers on a run's channel arrive in order and without holes unless a subscriber lost a message.
# KEYS[1] the run's sequence counter; ARGV: the event's JSON without its opening brace, the TTL of the counter,
# then the channels to publish on.
_PUBLISH_LUA = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local message = '{"seq":' .. n .. ',' .. ARGV[1]
for i = 3, #ARGV do redis.call('PUBLISH', ARGV[i], message) end
return n
"""
# A run's counter outlives a quiet week; if it expires, the next number restarts at 1 and subscribers take a
# snapshot (they see a hole), which is correct, only slower.
SEQ_TTL_SECONDS = 7 * 24 * 3600


def channel_prefix() -> str:
    from django.conf import settings

    return settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("prefix", "dex")


def run_channel(run_id: Any, prefix: str | None = None) -> str:
    """The Redis pub/sub channel of one run's events: `{DEX_CHANNEL_PREFIX}:run:{id}`."""
    return f"{prefix or channel_prefix()}:run:{run_id}"


def runs_channel(prefix: str | None = None) -> str:
    """The Redis pub/sub channel of every run's status changes (the run list): `{DEX_CHANNEL_PREFIX}:runs`."""
    return f"{prefix or channel_prefix()}:runs"


def _seq_key(run_id: Any, prefix: str) -> str:
    return f"{prefix}:seq:{run_id}"


def redis_url() -> str:
    from django.conf import settings

    return settings.REDIS_URL


class _Publisher:
    """One sender thread per process (started lazily, again after a fork) draining a queue in order.

    It runs the numbering script (_PUBLISH_LUA) with a plain Redis client, pipelining whatever queued up
    meanwhile into one round trip, so a worker's step pays for a queue put and nothing else. The channels and
    the message format are ours (see the module docstring), not the channel layer's.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[RunEvent, bool] | threading.Event | None] = queue.SimpleQueue()
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._redis: Any = None
        self._script: Any = None
        self._url: str | None = None

    def send(self, event: RunEvent, to_runs_list: bool) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    self._redis = None
                    threading.Thread(target=self._run, name="dex-publisher", daemon=True).start()
                    self._pid = os.getpid()
        self._queue.put((event, to_runs_list))

    def _run(self) -> None:
        # The thread blocks on the queue itself: a thread parked in an executor would be joined at
        # interpreter exit, and every process that had published would hang on exit.
        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [item for item in batch if isinstance(item, tuple)]
            if events:
                self._publish(events)
            for item in batch:
                if item is None:
                    return
                if isinstance(item, threading.Event):
                    item.set()

    def _publish(self, events: list[tuple[RunEvent, bool]]) -> None:
        import redis

        # Looked up per batch: a settings change (a test's channel prefix) changes the channels.
        prefix = channel_prefix()
        try:
            url = redis_url()
            if self._redis is None or self._url != url:
                self._redis = redis.Redis.from_url(url, socket_timeout=5)
                self._script = self._redis.register_script(_PUBLISH_LUA)
                self._url = url
            pipe = self._redis.pipeline(transaction=False)
            for event, to_runs_list in events:
                channels = [run_channel(event.run_id, prefix)]
                if to_runs_list:
                    channels.append(runs_channel(prefix))
                body = event.body()[1:]  # the script puts "{"seq": n," in front
                self._script(
                    keys=[_seq_key(event.run_id, prefix)], args=[body, SEQ_TTL_SECONDS, *channels], client=pipe
                )
            pipe.execute()
        except (redis.RedisError, OSError):  # Redis down: lost events are repaired by the next snapshot
            log.warning("could not publish %d run events", len(events), exc_info=True)
            self._redis = None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far was handed to Redis (tests, shutdown)."""
        if self._pid != os.getpid():
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)


_publisher = _Publisher()


def _deliver(event: RunEvent, *, to_runs_list: bool) -> None:
    for events in _captures:
        events.append(event)
    _publisher.send(event, to_runs_list)


def publish_now(event: RunEvent, *, to_runs_list: bool = False) -> None:
    """Publish at once. Rollback-unsafe: only for changes already committed."""
    _deliver(event, to_runs_list=to_runs_list)


def publish_on_commit(event: RunEvent, *, to_runs_list: bool = False) -> None:
    """Publish once the current transaction commits (at once in autocommit)."""
    transaction.on_commit(lambda: _deliver(event, to_runs_list=to_runs_list))


def run_changed(run_id: Any, status: str, **data: Any) -> RunEvent:
    return RunEvent("run", str(run_id), {"status": status, **data})


# --- subscribing (web processes) ----------------------------------------------------------------------------

Handler = Callable[[RunEvent | None], None]


class Subscriber:
    """One Redis pub/sub connection per event loop (a daphne process has one), shared by everything in the
    process that watches runs: a channel is subscribed once, however many sockets or streams watch it, and
    each message is parsed once and handed to every handler of its channel.

    A handler is called from the reader task with each RunEvent of its channel, in order; with None when the
    connection was lost and re-established (events in between are gone: the handler should take a snapshot).
    Handlers must not block; they typically put the event on their own queue.
    """

    RECONNECT_DELAY = 0.5

    def __init__(self) -> None:
        self._handlers: dict[str, set[Handler]] = {}
        self._redis: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    def subscribers(self, channel: str) -> int:
        return len(self._handlers.get(channel, ()))

    async def subscribe(self, channel: str, handler: Handler) -> None:
        handlers = self._handlers.setdefault(channel, set())
        handlers.add(handler)
        if len(handlers) > 1:
            return
        await self._connect()
        try:
            await self._pubsub.subscribe(channel)
        except (ConnectionError, OSError, redis_errors()) as exc:  # the reader reconnects and resubscribes
            log.warning("could not subscribe to %s: %s", channel, exc)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())

    async def unsubscribe(self, channel: str, handler: Handler) -> None:
        handlers = self._handlers.get(channel)
        if handlers is None:
            return
        handlers.discard(handler)
        if handlers:
            return
        del self._handlers[channel]
        if self._pubsub is not None:
            with contextlib.suppress(ConnectionError, OSError, redis_errors()):
                await self._pubsub.unsubscribe(channel)

    async def current_seq(self, run_id: Any) -> int | None:
        """The number of the run's last published event (None if unknown: none yet, expired, Redis down)."""
        await self._connect()
        try:
            value = await self._redis.get(_seq_key(run_id, channel_prefix()))
        except (ConnectionError, OSError, redis_errors()):
            return None
        return int(value) if value is not None else None

    async def _connect(self) -> None:
        if self._pubsub is None:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(redis_url())
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)

    async def _read(self) -> None:
        while self._handlers:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: resubscribe, then tell every handler to resync
                log.warning("run events: Redis connection lost (%s); reconnecting", exc)
                await self._reconnect()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            handlers = self._handlers.get(channel)
            if not handlers:
                continue
            event = RunEvent.parse(message["data"])
            if event is None:
                continue
            for handler in list(handlers):
                try:
                    handler(event)
                except Exception:
                    log.exception("run event handler failed")
        self._reader = None

    async def _reconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        self._pubsub = None
        while self._handlers:
            await asyncio.sleep(self.RECONNECT_DELAY)
            try:
                await self._connect()
                await self._pubsub.subscribe(*self._handlers)
                break
            except Exception as exc:
                log.warning("run events: still no Redis (%s)", exc)
                self._pubsub = None
        for handlers in list(self._handlers.values()):
            for handler in list(handlers):
                with contextlib.suppress(Exception):
                    handler(None)


def redis_errors() -> type[Exception]:
    import redis

    return redis.RedisError


_subscribers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Subscriber] = weakref.WeakKeyDictionary()


def subscriber() -> Subscriber:
    """This event loop's Subscriber (tests run several loops in one process, one after another)."""
    loop = asyncio.get_running_loop()
    sub = _subscribers.get(loop)
    if sub is None:
        sub = _subscribers[loop] = Subscriber()
    return sub
