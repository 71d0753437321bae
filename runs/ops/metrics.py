"""`GET /metrics`: Prometheus text, read from Postgres at scrape time.

Every web process answers the same (the numbers are the database's, not a process's counters), so any
replica can be scraped. A scrape is five bounded queries, each on an index; none reads the whole runs or
steps table (all-time counts of finished runs would: 25 ms at 100k runs, seconds at 10M, on every scrape):
- active runs by state and task (run_status_idx over the non-terminal states: the small part of the table);
- runs created in the last 24 hours by state and task, with their LLM cost (a primary-key range: ids are
  uuid7, so "created since" is "id >= uuid7_floor(since)");
- queue depth and the oldest queued run per queue (run_queued_idx, a partial index over queued runs);
- step durations of the steps settled in the last 5 minutes, from the newest STEP_SAMPLE steps (primary key);
- pending alert deliveries (alertdelivery_due_idx).

Access: `Authorization: Bearer $DEX_METRICS_TOKEN`, or a logged-in staff user.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from runs.ids import uuid7_floor
from runs.models import ACTIVE_STATUSES

STEP_WINDOW = timedelta(minutes=5)
STEP_SAMPLE = 5000
RECENT_WINDOW = timedelta(hours=24)
QUANTILES = (0.5, 0.9, 0.99)

_ACTIVE_SQL = """
SELECT status, task_id, count(*) FROM runs_run WHERE status = ANY(%(active)s) GROUP BY status, task_id
"""
_RECENT_SQL = """
SELECT status, task_id, count(*), sum(cost_usd) FROM runs_run WHERE id >= %(floor)s GROUP BY status, task_id
"""
# executions = 0: never claimed, so created_at is when it started waiting for a worker (a run woken from a
# sleep is queued again, but its created_at says nothing about how long it has been queued).
_QUEUES_SQL = """
SELECT queue, count(*),
       extract(epoch FROM now() - min(created_at) FILTER (WHERE executions = 0)),
       extract(epoch FROM now() - min(enqueued_at))
  FROM runs_run WHERE status = 'queued' GROUP BY queue
"""
_STEPS_SQL = """
WITH recent AS (
  SELECT kind, extract(epoch FROM finished_at - started_at) AS seconds, finished_at
    FROM runs_step ORDER BY id DESC LIMIT %(sample)s)
SELECT kind, count(*), coalesce(sum(seconds), 0),
       percentile_cont(%(quantiles)s::float8[]) WITHIN GROUP (ORDER BY seconds)
  FROM recent
 WHERE finished_at >= now() - make_interval(secs => %(window)s) AND seconds IS NOT NULL
 GROUP BY kind
"""
_ALERTS_SQL = "SELECT count(*) FROM runs_alertdelivery WHERE status = 'pending'"


class DexCollector(Collector):
    """Reads the database on every `collect()` (scrape)."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        with connection.cursor() as cur:
            cur.execute(_ACTIVE_SQL, {"active": [str(s) for s in ACTIVE_STATUSES]})
            active = cur.fetchall()
            cur.execute(_RECENT_SQL, {"floor": uuid7_floor(now - RECENT_WINDOW)})
            recent = cur.fetchall()
            cur.execute(_QUEUES_SQL)
            queues = cur.fetchall()
            cur.execute(
                _STEPS_SQL,
                {"sample": STEP_SAMPLE, "quantiles": list(QUANTILES), "window": STEP_WINDOW.total_seconds()},
            )
            steps = cur.fetchall()
            cur.execute(_ALERTS_SQL)
            (pending_alerts,) = cur.fetchone()

        runs = GaugeMetricFamily(
            "dex_runs",
            "Runs currently in each active state (delayed, queued, running, waiting), by task.",
            labels=["status", "task"],
        )
        parked = 0
        for status, task, count in active:
            runs.add_metric([status, task], count)
            if status in ("waiting", "delayed"):
                parked += count
        yield runs
        created = GaugeMetricFamily(
            "dex_runs_created_24h",
            "Runs created in the last 24h, by their state now and task (failure rate: failed / all).",
            labels=["status", "task"],
        )
        spend = GaugeMetricFamily(
            "dex_llm_cost_usd_24h", "LLM spend (USD) of runs created in the last 24h, by task.", labels=["task"]
        )
        cost_by_task: dict[str, float] = {}
        for status, task, count, cost in recent:
            created.add_metric([status, task], count)
            cost_by_task[task] = cost_by_task.get(task, 0.0) + float(cost or 0)
        for task, total in sorted(cost_by_task.items()):
            spend.add_metric([task], total)
        yield created
        yield spend
        yield GaugeMetricFamily(
            "dex_parked_runs", "Runs parked (waiting or delayed): rows with a wake-up, holding no worker.", value=parked
        )

        depth = GaugeMetricFamily("dex_queue_depth", "Queued runs per queue.", labels=["queue"])
        oldest = GaugeMetricFamily(
            "dex_oldest_queued_run_age_seconds",
            "Per queue: seconds since the oldest queued run that no worker has started yet was triggered.",
            labels=["queue"],
        )
        handed = GaugeMetricFamily(
            "dex_oldest_queued_run_enqueued_seconds",
            "Per queue: seconds since the oldest queued run was (last) handed to the broker.",
            labels=["queue"],
        )
        for queue, count, never_started_age, enqueued_age in queues:
            depth.add_metric([queue], count)
            oldest.add_metric([queue], float(never_started_age or 0))
            handed.add_metric([queue], float(enqueued_age or 0))
        yield depth
        yield oldest
        yield handed

        window = int(STEP_WINDOW.total_seconds())
        durations = GaugeMetricFamily(
            "dex_step_duration_seconds_recent",
            f"Quantiles of the durations of steps settled in the last {window}s (newest {STEP_SAMPLE} steps), by kind.",
            labels=["kind", "quantile"],
        )
        settled = GaugeMetricFamily(
            "dex_steps_settled_recent", f"Steps settled in the last {window}s, by kind.", labels=["kind"]
        )
        seconds = GaugeMetricFamily(
            "dex_step_seconds_recent", f"Total seconds of the steps settled in the last {window}s.", labels=["kind"]
        )
        for kind, count, total, quantiles in steps:
            settled.add_metric([kind], count)
            seconds.add_metric([kind], float(total))
            for q, value in zip(QUANTILES, quantiles or (), strict=False):
                durations.add_metric([kind, str(q)], float(value))
        yield durations
        yield settled
        yield seconds

        yield GaugeMetricFamily(
            "dex_alert_deliveries_pending",
            "Alert deliveries not yet delivered (in flight or retrying).",
            value=pending_alerts,
        )


def _allowed(request: HttpRequest) -> bool | None:
    """True (token or staff), False (credentials that don't grant access), None (no credentials at all)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        expected = settings.DEX_METRICS_TOKEN
        return bool(scheme.lower() == "bearer" and expected and hmac.compare_digest(token.strip(), expected))
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return bool(user.is_staff)
    return None


def _error(status: int, code: str, message: str) -> JsonResponse:
    response = JsonResponse({"error": {"code": code, "message": message}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="dex-metrics"'
    return response


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    allowed = _allowed(request)
    if allowed is None:
        return _error(401, "unauthorized", "send Authorization: Bearer <DEX_METRICS_TOKEN>, or log in as staff")
    if not allowed:
        return _error(403, "forbidden", "this token or user may not read metrics")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DexCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
