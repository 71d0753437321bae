"""The dashboard on a big database (issue #4): with 100,000 runs and 1,000,000 steps, the run list (first page,
filters, a deep cursor page, search), the run page of a run with 50,000 steps and the Tasks page each make a
bounded number of queries, none of them counts a whole table, and none reads one (no Seq Scan of runs or steps
in its plan, unless under a LIMIT).

The rows are made by Postgres itself (`INSERT ... SELECT ... FROM generate_series`) inside one transaction that
the module rolls back at the end: nothing is ever committed, so no other test sees them and no cleanup can be
left half done. Each test runs in a savepoint inside it (pytest-django's `db`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.db.models import Model
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs.models import Run, Step
from runs.ops.audit import roles_ensure

pytestmark = pytest.mark.django_db

RUNS = 100_000
STEPS = 1_000_000
# One run has this many steps; the others have 10 each (the last of them an LLM step), 1,000,000 in all.
BIG_RUN_STEPS = 50_000
SMALL_RUNS_WITH_STEPS = (STEPS - BIG_RUN_STEPS) // 10
TASKS = ["t-ten-steps", "t-fails", "t-typed", "t-sleep", "t-llm-chain"]
# The run list's budget (BENCH.md): session, user, permissions, the page, the counters, with room to spare.
LIST_QUERIES = 8
DETAIL_QUERIES = 8


class _Rollback(Exception):
    """Raised to leave the seeding transaction without committing it."""


def _defaults(model: type[Model], explicit: set[str]) -> tuple[list[str], list[str], list[Any]]:
    """Columns the seeding SQL doesn't set, with their model defaults as parameters: a field another change adds
    to the model (NOT NULL, with a Python-side default) doesn't break the seeding."""
    columns, placeholders, params = [], [], []
    for field in model._meta.concrete_fields:
        if field.column in explicit or (field.null and not field.has_default()):
            continue
        columns.append(connection.ops.quote_name(field.column))
        placeholders.append("%s")
        params.append(field.get_db_prep_save(field.get_default(), connection))
    return columns, placeholders, params


TASK_ARRAY = "ARRAY[" + ", ".join(f"'{t}'" for t in TASKS) + "]"
RUN_COLUMNS = [
    "id", "task_id", "status", "payload", "tags", "idempotency_key", "created_at", "started_at", "finished_at",
    "cost_usd", "executions",
]  # fmt: skip
# Run i was created (100,000 - i) x 25 s ago: the runs span ~29 days, the newest is now. Its id is a UUIDv7
# of that instant (48-bit milliseconds, version 7, a counter, variant, then i), like the ids the app makes.
RUN_SELECT = f"""
    SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' || lpad(to_hex(i %% 4096), 3, '0')
            || '8' || lpad(to_hex(i), 15, '0'))::uuid,
           ({TASK_ARRAY})[1 + i %% 5],
           CASE WHEN i %% 10 = 0 THEN 'failed' WHEN i %% 50 = 1 THEN 'waiting' WHEN i %% 50 = 3 THEN 'canceled'
                ELSE 'completed' END,
           jsonb_build_object('n', i),
           ARRAY['batch-' || (i %% 100)]::varchar[],
           CASE WHEN i %% 10 = 5 THEN 'key-' || i ELSE '' END,
           ts, ts, CASE WHEN i %% 50 = 1 THEN NULL ELSE ts + make_interval(secs => i %% 17) END,
           (i %% 7) * 0.001, 1
      FROM (SELECT i, now() - make_interval(secs => ({RUNS} - i) * 25) AS ts
              FROM generate_series(1, {RUNS}) AS i) AS g
"""
STEP_COLUMNS = ["run_id", "seq", "key", "kind", "status", "started_at", "finished_at", "output", "meta"]
STEP_SELECT = """
    SELECT r.id, s, 's' || s, CASE WHEN s %% 10 = 9 THEN 'ai' ELSE 'step' END, 'completed',
           r.started_at + make_interval(secs => s * 0.01), r.started_at + make_interval(secs => s * 0.01 + 0.005),
           to_jsonb(s),
           CASE WHEN s %% 10 = 9 THEN jsonb_build_object('usage', jsonb_build_object(
                'model', 'gpt-5-mini', 'input_tokens', 100, 'output_tokens', 50, 'cost_usd', '0.0001'))
                ELSE '{{}}'::jsonb END
      FROM {runs} AS r CROSS JOIN generate_series(0, {steps} - 1) AS s
"""


@pytest.fixture(scope="module")
def big(django_db_setup: None, django_db_blocker: Any) -> Iterator[dict[str, Any]]:
    """100,000 runs and 1,000,000 steps, uncommitted; rolled back when the module is done."""
    with django_db_blocker.unblock():
        try:
            with transaction.atomic():
                yield _seed()
                raise _Rollback
        except _Rollback:
            pass


def _insert(cur: Any, model: type[Model], columns: list[str], select: str) -> None:
    extra, marks, params = _defaults(model, {"id", *columns} if model is Step else set(columns))
    cur.execute(
        f"INSERT INTO {model._meta.db_table} ({', '.join(columns + extra)}) "
        f"SELECT q.*{''.join(', ' + m for m in marks)} FROM ({select}) AS q",
        params,
    )


def _seed() -> dict[str, Any]:
    started = time.monotonic()
    run_table = Run._meta.db_table
    with connection.cursor() as cur:
        # A plan gone wrong fails this module in a minute instead of holding its locks for the rest of the suite.
        cur.execute("SET LOCAL statement_timeout = '90s'")
        _insert(cur, Run, RUN_COLUMNS, RUN_SELECT)
        # Statistics before the steps' foreign keys are checked: the check's plan is cached per connection, and one
        # made when earlier tests left the table nearly empty would scan all 100,000 runs for each of the 1,000,000
        # steps. (ANALYZE sees this transaction's own rows, and invalidates cached plans on the table.)
        cur.execute(f"ANALYZE {run_table}")
        # Every step is made from a run just inserted, so their foreign keys hold by construction. A superuser (the
        # embedded Postgres, CI's) skips the 1,000,000 checks; otherwise they run once here: left deferred, every
        # test's end (Django checks constraints before rolling its savepoint back) would check them again.
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        superuser = bool(cur.fetchone()[0])
        if superuser:
            cur.execute("SET LOCAL session_replication_role = replica")
        # The newest run is the big one; the 95,000 before it have 10 steps each.
        newest = f"(SELECT id, started_at FROM {run_table} ORDER BY id DESC LIMIT 1)"
        small = f"(SELECT id, started_at FROM {run_table} ORDER BY id DESC OFFSET 1 LIMIT {SMALL_RUNS_WITH_STEPS})"
        _insert(cur, Step, STEP_COLUMNS, STEP_SELECT.format(runs=newest, steps=BIG_RUN_STEPS))
        _insert(cur, Step, STEP_COLUMNS, STEP_SELECT.format(runs=small, steps=10))
        if superuser:
            cur.execute("SET LOCAL session_replication_role = origin")
        else:
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cur.execute("SET CONSTRAINTS ALL DEFERRED")
        seeded = time.monotonic() - started
        # Planner statistics for the steps too, as autovacuum would have them on a real database.
        cur.execute(f"ANALYZE {Step._meta.db_table}")
        cur.execute("SET LOCAL statement_timeout = 0")
        cur.execute(f"SELECT id FROM {run_table} ORDER BY id DESC LIMIT 1")
        big_run = cur.fetchone()[0]
        cur.execute(f"SELECT id FROM {run_table} ORDER BY id DESC OFFSET {RUNS // 2} LIMIT 1")
        middle = cur.fetchone()[0]
    analyzed = time.monotonic() - started - seeded
    print(f"\nseeded {RUNS:,} runs and {STEPS:,} steps in {seeded:.1f} s (+ ANALYZE {analyzed:.1f} s)")
    return {"big_run": big_run, "middle": middle, "seconds": seeded}


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("scale-op", password="pw-scale-123")
    roles_ensure()
    user.groups.add(Group.objects.get(name="operator"))
    client = Client()
    client.force_login(user)
    return client


# A COUNT is fine over a LIMITed subquery (the capped counters), one run's rows (its steps, logs, children) or a
# time window on the time-ordered id; anything else counts a whole table, which Postgres does row by row.
BOUNDED_COUNT = re.compile(r'\blimit \d+|"run_id" = |"parent_id" = |"parent_id" IN \(|"id" >= ', re.IGNORECASE)


def unbounded_counts(queries: list[dict[str, str]]) -> list[str]:
    return [q["sql"] for q in queries if "count(" in q["sql"].lower() and not BOUNDED_COUNT.search(q["sql"])]


def full_scans(queries: list[dict[str, str]]) -> list[str]:
    """Each query whose plan reads a whole run or step table: a Seq Scan with no Limit above it (under a Limit,
    as in the capped counters, a scan stops after that many rows)."""
    found = []
    with connection.cursor() as cur:
        for query in queries:
            sql = query["sql"]
            if not sql.lstrip().upper().startswith("SELECT") or "runs_" not in sql:
                continue
            cur.execute("EXPLAIN (FORMAT JSON) " + sql)
            plan = cur.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            if _unlimited_seq_scans(plan[0]["Plan"], limited=False):
                found.append(f"{sql}\n{json.dumps(plan, indent=1)}")
    return found


def _unlimited_seq_scans(node: dict[str, Any], *, limited: bool) -> bool:
    limited = limited or node["Node Type"] == "Limit"
    if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in ("runs_run", "runs_step") and not limited:
        return True
    return any(_unlimited_seq_scans(child, limited=limited) for child in node.get("Plans", []))


def get(client: Client, url: str, budget: int, django_assert_max_num_queries: Any) -> str:
    with CaptureQueriesContext(connection) as captured, django_assert_max_num_queries(budget):
        response = client.get(url)
    assert response.status_code == 200, url
    assert unbounded_counts(captured.captured_queries) == []
    assert full_scans(captured.captured_queries) == []
    return response.content.decode()


def row_ids(page: str) -> list[str]:
    return re.findall(r'<tr id="run-([0-9a-f-]{36})"', page)


def test_the_seeding_is_the_size_the_issue_asks_for(big: dict[str, Any]) -> None:
    with connection.cursor() as cur:
        # Counting once here is the point: proving the tables are as big as claimed.
        cur.execute("SELECT (SELECT count(*) FROM runs_run), (SELECT count(*) FROM runs_step)")
        runs, steps = cur.fetchone()
    assert runs >= RUNS and steps >= STEPS


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=failed",
        "?status=waiting&status=canceled",
        "?task=t-fails",
        "?tag=batch-7",
        "?status=waiting&tag=batch-1",
        "?created_after={ten_days_ago}&created_before={ten_days_ago}",
        "?q=key-99995",
        "?q={middle}",
        "?cursor={middle}",
        "?status=completed&cursor={middle}",
    ],
)
def test_every_run_list_page_makes_a_bounded_number_of_queries_and_counts_no_table(
    big: dict[str, Any], operator: Client, django_assert_max_num_queries: Any, query: str
) -> None:
    ten_days_ago = (timezone.now() - timedelta(days=10)).date().isoformat()
    url = "/" + query.format(middle=big["middle"], ten_days_ago=ten_days_ago)

    page = get(operator, url, LIST_QUERIES, django_assert_max_num_queries)

    rows = row_ids(page)
    assert rows, f"{url} shows no run"
    assert len(rows) <= 50
    if "q=" in url:
        assert len(rows) == 1
    if "cursor=" in url:
        assert all(UUID(row) < big["middle"] for row in rows)
        assert 'rel="next"' in page  # 50,000 older runs: there is a next page
    if "created_after" in url:
        day = timezone.now() - timedelta(days=10)
        created = [Run.objects.get(pk=row).created_at for row in rows]
        assert all(timezone.localtime(c).date() == timezone.localtime(day).date() for c in created)


def test_the_page_of_a_run_with_50000_steps_makes_a_bounded_number_of_queries(
    big: dict[str, Any], operator: Client, django_assert_max_num_queries: Any
) -> None:
    page = get(operator, f"/runs/{big['big_run']}/", DETAIL_QUERIES, django_assert_max_num_queries)

    assert f"{BIG_RUN_STEPS - 200} earlier steps not shown" in page
    assert f'data-key="s{BIG_RUN_STEPS - 1}"' in page


def test_the_tasks_page_stats_make_a_bounded_number_of_queries(
    big: dict[str, Any], operator: Client, django_assert_max_num_queries: Any
) -> None:
    page = get(operator, "/tasks/", 8, django_assert_max_num_queries)

    # ~3,456 runs in the last 24 hours, ~690 a task, each with an LLM step of 150 tokens (the newest: 5,000).
    for task_id in TASKS:
        row = page.split(f'id="task-{task_id}"', 1)[1].split("</tr>", 1)[0]
        runs = int(re.search(r">(\d+)</a>", row).group(1))
        tokens = int(re.search(r'class="num task-tokens"[^>]*>(\d+)<', row).group(1))
        assert 600 < runs < 800, row
        assert tokens >= 150 * (runs - 1), row
        assert re.search(r'class="num task-cost">\$\d+\.\d{4}<', row), row
