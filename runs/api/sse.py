"""`GET /api/runs/{id}/stream`: one run's events as server-sent events, for frontends that aren't ours.

The same stream the dashboard gets, as JSON: first `event: snapshot` (the run's status and its steps, read
after subscribing to the run's channel, so nothing falls between the two), then each runs.realtime.RunEvent
of the run as `event: <kind>` (run, step, log, metadata, token) with `id: <seq>`, its number in the run's
sequence. A comment line every HEARTBEAT_SECONDS keeps proxies
from closing an idle stream; the stream ends after the run's terminal status. Pub/sub is at-most-once, so each
heartbeat also checks Postgres and ends a stream whose final event was lost, and a hole in the sequence (or a
re-made Redis connection) sends a fresh `snapshot` before the events go on.

Authentication is the API's: `Authorization: Bearer <api key>`, errors as `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET

from runs import realtime
from runs.api import keyauth
from runs.models import TERMINAL_STATUSES, ApiKeyScope, Run

HEARTBEAT_SECONDS = 15.0


def _error(status: int, code: str, message: str) -> JsonResponse:
    response = JsonResponse({"error": {"code": code, "message": message}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="dex"'
    return response


def _run_exists(run_id: UUID) -> bool:
    return Run.objects.filter(pk=run_id).exists()


def _snapshot(run_id: UUID) -> dict[str, Any] | None:
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return None
    return {
        "run": {
            "id": run.pk,
            "task": run.task_id,
            "status": run.status,
            "output": run.output,
            "error": run.error,
            "metadata": run.metadata,
            "created_at": run.created_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
        },
        "steps": [
            {
                "key": step.key,
                "kind": step.kind,
                "status": step.status,
                "attempts": step.attempts,
                "error": step.error,
                "started_at": step.started_at,
                "finished_at": step.finished_at,
            }
            for step in run.steps.order_by("seq")
        ],
    }


def _run_status(run_id: UUID) -> str | None:
    return Run.objects.filter(pk=run_id).values_list("status", flat=True).first()


def _sse(event: str, data: Any, *, seq: int | None = None) -> str:
    # json.dumps never emits a raw newline, so `data` is always a single line. `id:` is the event's number in
    # its run's sequence (runs.realtime), so a client can tell it missed one.
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, cls=DjangoJSONEncoder)}\n\n"


@require_GET
async def run_stream(request: HttpRequest, run_id: UUID) -> HttpResponse:
    try:
        await database_sync_to_async(keyauth.authenticate)(request, scope=ApiKeyScope.READ.value)
    except keyauth.ApiAuthError as exc:
        response = _error(exc.status, exc.code, exc.message)
        if exc.retry_after is not None:
            response["Retry-After"] = str(exc.retry_after)
        return response
    if not await database_sync_to_async(_run_exists)(run_id):
        return _error(404, "not_found", f"no run with id {run_id}")
    response = StreamingHttpResponse(run_events(run_id), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


async def run_events(run_id: UUID) -> AsyncIterator[str]:
    """The stream's body. Leaving it (run finished, client gone: Django cancels a streaming response whose
    client disconnected) unsubscribes it from the run's channel."""
    channel = realtime.run_channel(run_id)
    events: asyncio.Queue[realtime.RunEvent | None] = asyncio.Queue()
    subscriber = realtime.subscriber()
    # Subscribed before the snapshot's read, so nothing falls between the two.
    await subscriber.subscribe(channel, events.put_nowait)
    try:
        snapshot = await database_sync_to_async(_snapshot)(run_id)
        if snapshot is None:
            return
        yield _sse("snapshot", snapshot)
        if snapshot["run"]["status"] in TERMINAL_STATUSES:
            return
        last_seq: int | None = None
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=HEARTBEAT_SECONDS)
            except TimeoutError:
                event = None
            else:
                lost = event is None or (event.seq is not None and last_seq is not None and event.seq != last_seq + 1)
                if event is not None:
                    last_seq = event.seq
                if lost:
                    # A hole in the run's sequence, or the Redis connection was re-made: the client gets the
                    # run as it is now, then the events go on.
                    snapshot = await database_sync_to_async(_snapshot)(run_id)
                    if snapshot is None:
                        return
                    yield _sse("snapshot", snapshot)
                    if snapshot["run"]["status"] in TERMINAL_STATUSES:
                        return
                    if event is None:
                        continue
            if event is None:  # quiet for a while: ask Postgres whether the run ended (its last event was lost)
                status = await database_sync_to_async(_run_status)(run_id)
                if status is None:
                    return
                if status in TERMINAL_STATUSES:
                    yield _sse("run", {"status": status})
                    return
                yield ": heartbeat\n\n"
                continue
            if event.run_id != str(run_id):
                continue
            yield _sse(event.kind, event.data, seq=event.seq)
            if event.kind == "run" and event.data.get("status") in TERMINAL_STATUSES:
                return
    finally:
        await subscriber.unsubscribe(channel, events.put_nowait)
