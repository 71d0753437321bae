"""Matching one event against 10,000 waiting runs is index probes, not a scan (DESIGN §3): the open waits are
found by (event_name, match_key) for every combination of the event's top-level scalar pairs, so the work
doesn't grow with the number of waiting runs. The rows are made by Postgres (generate_series) inside the test's
transaction, which is rolled back."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs import services
from runs.engine.waits import _DELIVER_SQL, event_match_keys, match_key
from runs.models import Run, RunStatus, Waitpoint

pytestmark = pytest.mark.django_db

WAITING = 10_000


def seed_waiting_runs() -> None:
    """10,000 runs waiting for `order.paid` with match {"order": i}, and 100 with a nested (non-flat) match."""
    with connection.cursor() as cur:
        cur.execute(
            """INSERT INTO runs_run (id, task_id, status, payload, tags, metadata, queue, priority, idempotency_key,
                                     created_at, lease_owner, lease_token, executed_seconds, recoveries, executions,
                                     cost_usd, saved_usd, status_reason, code_version, execution_versions, resends)
               SELECT gen_random_uuid(), 't-wait-event', 'waiting', '{}', '{}', '{}', 'dex', 0, '', now(), '', 1, 0,
                      0, 1, 0, 0, '', '', '[]', 0
                 FROM generate_series(1, %(n)s)""",
            {"n": WAITING + 100},
        )
        cur.execute(
            """INSERT INTO runs_waitpoint (run_id, step_key, kind, token, event_name, match, match_key, prompt, form,
                                          created_at, timed_out)
               SELECT id, 'paid', 'event', md5(id::text), 'order.paid',
                      CASE WHEN n <= %(n)s THEN jsonb_build_object('order', n)
                           ELSE jsonb_build_object('customer', jsonb_build_object('id', n)) END,
                      CASE WHEN n <= %(n)s THEN '{"order":' || n || '}' END,  -- canonical, as match_key() writes it
                      '', '', now(), false
                 FROM (SELECT id, row_number() OVER (ORDER BY id) AS n
                         FROM runs_run WHERE task_id = 't-wait-event') r""",
            {"n": WAITING},
        )
        cur.execute("ANALYZE runs_waitpoint")


def test_match_keys_are_canonical_and_cover_every_flat_match_an_event_satisfies() -> None:
    assert match_key({"b": 2, "a": "x"}) == match_key({"a": "x", "b": 2.0}) == '{"a":"x","b":2}'
    assert match_key({"customer": {"id": 1}}) is None  # nested: compared with @> instead
    assert match_key({"a": 1, "b": 2, "c": 3, "d": 4}) is None  # too many keys to probe for
    keys = event_match_keys({"order": 7, "currency": "EUR", "lines": [1, 2]})
    assert {"{}", '{"order":7}', '{"currency":"EUR"}', '{"currency":"EUR","order":7}'} == set(keys)


def test_one_event_resumes_its_one_run_among_ten_thousand_with_a_constant_number_of_queries() -> None:
    seed_waiting_runs()
    target = Waitpoint.objects.get(event_name="order.paid", match={"order": 4242})
    with CaptureQueriesContext(connection) as queries:
        event, created = services.event_send(name="order.paid", data={"order": 4242, "amount": 10})
    assert created and event.outcome["resumed"] == [str(target.run_id)]
    assert Run.objects.get(pk=target.run_id).status == RunStatus.QUEUED
    assert Waitpoint.objects.filter(event_name="order.paid", completed_at__isnull=False).count() == 1
    # lock, insert, match, wake, the subscribers' lookup-free loop, the outcome, the read back: independent of N.
    assert len(queries) <= 8, [q["sql"][:80] for q in queries]


def test_the_match_is_an_index_probe_not_a_scan() -> None:
    seed_waiting_runs()
    data = {"order": 4242, "amount": 10}
    with connection.cursor() as cur:
        cur.execute(
            "EXPLAIN " + _DELIVER_SQL,
            {
                "name": "order.paid",
                "keys": event_match_keys(data),
                "data": json.dumps(data),
                "event": "00000000-0000-7000-8000-000000000000",
            },
        )
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "waitpoint_open_match_idx" in plan, plan
    assert "Seq Scan on runs_waitpoint" not in plan, plan
