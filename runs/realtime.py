"""Publishing run changes to the Channels groups `runs` and `run.<id>`.

Events are small and typed; HTML for htmx clients is rendered in the consumer from the database, where it is
cheapest (ENGINE.md "Publish"). Sending happens on a background thread with its own event loop, so a
worker's step never waits on Redis; the channel layer is at-most-once and Postgres is the record, so a lost
event only delays a client until its next snapshot.

`publish_on_commit` is the default; `publish_now` is for code already past its commit (the engine's
autocommit statements) and says so in its name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from django.db import transaction

log = logging.getLogger(__name__)

RUNS_GROUP = "runs"

EventKind = Literal["run", "step", "log", "metadata", "token"]


def run_group(run_id: Any) -> str:
    return f"run.{run_id}"


@dataclass(frozen=True)
class RunEvent:
    """One change of a run: its status (`run`), a step starting or settling (`step`), a log line (`log`),
    metadata (`metadata`) or LLM tokens (`token`)."""

    kind: EventKind
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        return {"type": "run.event", "event": asdict(self)}


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


class _Publisher:
    """One sender thread per process (started lazily, again after a fork) draining a queue in order.

    With the pub/sub channel layer (our default) it PUBLISHes with a plain Redis client, pipelining
    whatever queued up meanwhile into one round trip, in the layer's own wire format (its group channel
    name and serializer), so a worker's step pays for a queue put and nothing else. Any other layer gets
    `group_send` on a private event loop.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[list[str], dict] | None] = queue.SimpleQueue()
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._redis: Any = None

    def send(self, groups: list[str], message: dict) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    self._redis = None
                    threading.Thread(target=self._run, name="dex-publisher", daemon=True).start()
                    self._pid = os.getpid()
        self._queue.put((groups, message))

    def _run(self) -> None:
        # The thread blocks on the queue itself: a thread parked in an executor would be joined at
        # interpreter exit, and every process that had published would hang on exit.
        loop: asyncio.AbstractEventLoop | None = None
        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            messages = [item for item in batch if item is not None and "__flush__" not in item[1]]
            if messages:
                from channels.layers import get_channel_layer
                from channels_redis.pubsub import RedisPubSubChannelLayer

                # Looked up per batch: a settings change (a test's channel prefix) replaces the layer.
                layer = get_channel_layer()
                if isinstance(layer, RedisPubSubChannelLayer):
                    self._publish(layer, messages)
                else:
                    loop = loop or asyncio.new_event_loop()
                    loop.run_until_complete(self._group_send(layer, messages))
            for item in batch:
                if item is None:
                    return
                if "__flush__" in item[1]:
                    item[1]["__flush__"].set()

    def _publish(self, layer: Any, messages: list[tuple[list[str], dict]]) -> None:
        import redis
        from django.conf import settings

        config = settings.CHANNEL_LAYERS["default"].get("CONFIG", {})
        prefix = config.get("prefix", "asgi")
        try:
            if self._redis is None:
                host = config["hosts"][0]
                url = host["address"] if isinstance(host, dict) else host
                self._redis = redis.Redis.from_url(url, socket_timeout=5)
            pipe = self._redis.pipeline(transaction=False)
            for groups, message in messages:
                payload = layer.serialize(message)
                for group in groups:
                    pipe.publish(f"{prefix}__group__{group}", payload)
            pipe.execute()
        except (redis.RedisError, OSError):  # Redis down: lost events are repaired by the next snapshot
            log.warning("could not publish %d run events", len(messages), exc_info=True)
            self._redis = None

    @staticmethod
    async def _group_send(layer: Any, messages: list[tuple[list[str], dict]]) -> None:
        for groups, message in messages:
            for group in groups:
                try:
                    await layer.group_send(group, message)
                except Exception:  # Redis down: the event is lost, the snapshot on reconnect repairs it
                    log.warning("could not publish to %s", group, exc_info=True)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far was handed to the channel layer (tests, shutdown)."""
        if self._pid != os.getpid():
            return
        done = threading.Event()
        self._queue.put(([], {"__flush__": done}))
        done.wait(timeout)


_publisher = _Publisher()


def _deliver(event: RunEvent, *, to_runs_list: bool) -> None:
    for events in _captures:
        events.append(event)
    groups = [run_group(event.run_id)]
    if to_runs_list:
        groups.append(RUNS_GROUP)
    _publisher.send(groups, event.message())


def publish_now(event: RunEvent, *, to_runs_list: bool = False) -> None:
    """Publish at once. Rollback-unsafe: only for changes already committed."""
    _deliver(event, to_runs_list=to_runs_list)


def publish_on_commit(event: RunEvent, *, to_runs_list: bool = False) -> None:
    """Publish once the current transaction commits (at once in autocommit)."""
    transaction.on_commit(lambda: _deliver(event, to_runs_list=to_runs_list))


def run_changed(run_id: Any, status: str, **data: Any) -> RunEvent:
    return RunEvent("run", str(run_id), {"status": status, **data})
