"""Faults against real processes (Celery workers, the scheduler, daphne, Postgres, Redis), counted from the
database and an external side-effect ledger (bench.faultkit): the CI-sized subset of
`bench/run.py --only faults`.

Covered elsewhere and not repeated here: a single SIGKILL mid-step, duplicate deliveries, two workers racing,
non-JSON / oversized step output and cancel during a step (tests/integration/test_worker.py); the late
result of a step in-process (tests/unit/test_engine.py). This suite adds ledger accounting to them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import faultcases, faultkit
from bench.faultkit import Cluster, PrivatePostgres, PrivateRedis
from runs.models import Run, RunStatus

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def assert_clean(figures: faultkit.Figures) -> None:
    assert figures.stuck_runs == 0, figures
    assert figures.completed == figures.runs, figures
    assert figures.reexecuted_committed_steps == 0, figures
    assert figures.inflight_reruns <= figures.faults, figures
    assert figures.missing_steps == 0, figures


def test_sigkilled_workers_lose_no_run_and_rerun_no_committed_step(cluster: Cluster, ledger: Path) -> None:
    figures = faultcases.sigkill_workers(cluster, ledger, runs=3, faults=3, steps=8, pause=0.3)
    assert figures.faults == 3
    assert_clean(figures)


def test_a_poison_run_is_dead_lettered_after_the_allowed_recoveries(cluster: Cluster, ledger: Path) -> None:
    outcome = faultcases.poison_run(cluster, ledger, max_recoveries=3)
    assert outcome["status"] == RunStatus.FAILED
    assert outcome["error_type"] == "WorkerLost"
    assert outcome["poison_executions"] == 3  # one execution per recovery, then no more
    assert outcome["s1_executions"] == 1  # the committed step before it never ran again
    assert outcome["worker_alive"]


def test_triggers_are_accepted_while_redis_is_down_and_run_once_it_is_back(
    cluster: Cluster, private_redis: PrivateRedis, ledger: Path, api_secret: str
) -> None:
    from dexweb.settings import celery_url_from_redis

    cluster.env.update({"REDIS_URL": private_redis.url, "CELERY_BROKER_URL": celery_url_from_redis(private_redis.url)})
    outcome = faultcases.redis_outage(
        cluster, private_redis, ledger, secret=api_secret, down_seconds=5, triggers=5, steps=3
    )
    assert outcome["statuses"] == [201], outcome
    assert outcome["accepted"] == outcome["triggers"] == 6
    assert outcome["stuck_runs"] == 0, outcome
    assert outcome["completed"] == 6, outcome
    assert outcome["reexecuted_committed_steps"] == 0, outcome
    assert outcome["missing_steps"] == 0, outcome


def test_a_postgres_restart_mid_run_loses_nothing(
    cluster: Cluster, private_postgres: PrivatePostgres, ledger: Path
) -> None:
    cluster.env["DATABASE_URL"] = private_postgres.url("dex_faults")
    faultkit.migrate(cluster.env)
    outcome = faultcases.postgres_restart(cluster, private_postgres, ledger, runs=3, steps=6, pause=0.2)
    assert outcome["stuck_runs"] == 0, outcome
    assert outcome["completed"] == 3, outcome
    assert outcome["reexecuted_committed_steps"] == 0, outcome
    assert outcome["inflight_reruns"] <= outcome["faults"], outcome
    assert outcome["missing_steps"] == 0, outcome


def test_a_stream_client_misses_no_step_across_a_daphne_restart(
    cluster: Cluster, ledger: Path, api_secret: str
) -> None:
    outcome = faultcases.daphne_restart(cluster, ledger, secret=api_secret, restarts=1, steps=8, pause=0.25)
    assert outcome["status"] == RunStatus.COMPLETED
    assert outcome["daphne_restarts"] == 1 and outcome["connections"] == 2
    assert outcome["steps_committed"] == 8
    assert outcome["stream_missed_steps"] == []
    assert outcome["page_connections"] >= 2  # the dashboard's websocket reconnected too
    assert outcome["page_missed_steps"] == []
    assert outcome["missed_events"] == 0


def test_a_step_that_comes_back_after_its_timeout_has_its_result_discarded(cluster: Cluster, ledger: Path) -> None:
    outcome = faultcases.late_result(cluster, ledger)
    assert outcome["status"] == RunStatus.COMPLETED
    assert outcome["output"] == "on time"
    assert outcome["attempts"] == 2
    assert "result was discarded" in outcome["first_error"]
    assert outcome["attempts_in_ledger"] == [1, 2]


def test_duplicate_deliveries_to_racing_workers_execute_every_step_once(cluster: Cluster, ledger: Path) -> None:
    figures = faultcases.duplicate_deliveries(cluster, ledger, runs=3, copies=3)
    assert_clean(figures)
    assert figures.inflight_reruns == 0
    assert figures.detail["owners_per_run"] == 1


def test_a_ten_megabyte_body_gets_413_from_the_real_server(cluster: Cluster, api_secret: str) -> None:
    port = faultkit.free_port()
    cluster.daphne(port)
    body = {"payload": {"ledger": "/dev/null", "blob": "x" * (10 * 1024 * 1024)}}
    url = f"http://127.0.0.1:{port}/api/tasks/fault-chain/trigger"
    status, answer = faultkit.http_json("POST", url, body, secret=api_secret)
    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"
    assert not Run.objects.filter(task_id="fault-chain").exists()
