"""dashboard: the run list and the run page at 1,000 runs and at 100,000 runs / 1,000,000 steps.

Two databases of the bench's own (`<bench db>_dash_small`, `<bench db>_dash_large`), migrated and seeded by
Postgres itself (`INSERT … SELECT … FROM generate_series`): N runs with UUIDv7 ids spread over ~29 days,
mostly completed (10 % failed, 2 % waiting, 2 % canceled), 10 steps each. A seeded database is kept for the
next bench run (a marker table records its size and the model's columns; anything else is re-seeded).

The pages are fetched in this process through Django's test Client (the whole stack: middleware, session,
view, selectors, templates) by a logged-in operator, one Client per database:
  list_first   `/`                     the first page (50 runs) with the per-status counters
  list_status  `/?status=failed`       a status filter
  list_deep    `/?cursor=<id>`         a page 90 % of the way down (keyset cursor)
  detail       `/runs/<id>/`           a run of 10 steps
  detail_2000  `/runs/<id>/`           a run of 2,000 steps (one such run per database, made at first use)
The two sizes alternate (small, large, small, …) after a warm-up; 5 repeats of `rounds` rounds, each round
fetching every page once. Per repeat: the p95 of the list pages' times at each size; `ratio_p95_100k_vs_1k`
is paired per repeat, median with min–max.

Queries are captured (django CaptureQueriesContext) on one fetch of each page at each size:
`queries_per_page` is the maximum over pages and sizes. Each captured query is EXPLAINed on the large
database: `unbounded_counts` counts COUNT(…) queries over runs/steps without a LIMIT below them or a filter on
one run (the capped counters count at most 10,001 index entries per status, which is fine); `full_scans_100k`
counts plans with a Seq Scan of runs_run/runs_step not under a Limit.
With --tiny the sizes are 200 and 2,000 runs (the figures keep their `_100k`/`_1k` names; `sizes` says).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import time
from typing import Any

from bench.harness import BenchEnv, goal_met, log, rounded, spread

NAME = "dashboard"
GOAL = {"queries_per_page": "<= 8", "ratio_p95_100k_vs_1k": "<= 1.5", "unbounded_counts": "== 0"}
SIZES = {"full": (1_000, 100_000), "quick": (1_000, 100_000), "tiny": (200, 2_000)}
STEPS_PER_RUN = 10
ROUNDS = {"full": 20, "quick": 6, "tiny": 2}
REPEATS = {"full": 5, "quick": 5, "tiny": 1}
WARMUP = {"full": 3, "quick": 2, "tiny": 1}
LIST_PAGES = ("list_first", "list_status", "list_deep")
SPAN_SECONDS = 2_500_000  # ~29 days of runs, whatever their number


def run(env: BenchEnv) -> dict:
    started = time.monotonic()
    small_n, large_n = SIZES[env.sizes.name]
    dbs = {"small": Database(env, "small", small_n), "large": Database(env, "large", large_n)}
    for db in dbs.values():
        db.prepare()
        env.stack.callback(db.close)

    queries: dict[str, dict[str, list[str]]] = {}
    for label, db in dbs.items():
        with db.active():
            queries[label] = {page: db.capture(page) for page in db.pages}
    with dbs["large"].active():
        plans = {page: _inspect(sqls) for page, sqls in queries["large"].items()}

    warmup, rounds, repeats = WARMUP[env.sizes.name], ROUNDS[env.sizes.name], REPEATS[env.sizes.name]
    log(f"timing: {warmup} warm-up round(s), {repeats} repeats of {rounds} rounds (small, large alternately)")
    for _ in range(warmup):
        for db in dbs.values():
            with db.active():
                db.fetch_all()
    samples: dict[str, list[dict[str, list[float]]]] = {"small": [], "large": []}
    for r in range(repeats):
        for label in dbs:
            samples[label].append({page: [] for page in dbs[label].pages})
        for _ in range(rounds):
            for label, db in dbs.items():
                with db.active():
                    for page, ms in db.fetch_all().items():
                        samples[label][r][page].append(ms)
        p95 = {label: _list_p95(samples[label][r]) for label in dbs}
        log(f"repeat {r + 1}/{repeats}: list p95 small {p95['small']:.1f} ms, large {p95['large']:.1f} ms")

    series = {
        "list_p95_ms_100k": [_list_p95(rep) for rep in samples["large"]],
        "list_p95_ms_1k": [_list_p95(rep) for rep in samples["small"]],
    }
    series["ratio_p95_100k_vs_1k"] = [
        a / b for a, b in zip(series["list_p95_ms_100k"], series["list_p95_ms_1k"], strict=True)
    ]
    series["detail_p95_ms_100k"] = [_pct(rep["detail"], 95) for rep in samples["large"]]
    series["detail_p95_ms_1k"] = [_pct(rep["detail"], 95) for rep in samples["small"]]
    series["detail_2000_steps_p95_ms_100k"] = [_pct(rep["detail_2000"], 95) for rep in samples["large"]]
    spreads = {name: spread(values) for name, values in series.items()}
    counts = {label: {page: len(sqls) for page, sqls in pages.items()} for label, pages in queries.items()}
    figures: dict[str, Any] = {
        "queries_per_page": max(n for pages in counts.values() for n in pages.values()),
        **{name: s["median"] for name, s in spreads.items()},
        "unbounded_counts": sum(len(p["unbounded_counts"]) for p in plans.values()),
        "full_scans_100k": sum(len(p["full_scans"]) for p in plans.values()),
        "runs_large": large_n,
        "steps_large": large_n * STEPS_PER_RUN,
    }
    goals_met = {name: goal_met(figures.get(name), goal) for name, goal in GOAL.items()}
    per_page = {
        label: {page: spread([x for rep in samples[label] for x in rep[page]]) for page in dbs[label].pages}
        for label in dbs
    }
    return rounded(
        {
            "figures": figures,
            "goal": GOAL,
            "met": all(goals_met.values()),
            "goals_met": goals_met,
            "ranges": {name: [s["min"], s["max"]] for name, s in spreads.items()},
            "per_repeat": series,
            "queries": counts,
            "statements_large": {page: [_head(s) for s in sqls] for page, sqls in queries["large"].items()},
            "problems": {page: p for page, p in plans.items() if p["unbounded_counts"] or p["full_scans"]},
            "page_ms": per_page,
            "seeding": {label: db.seeding for label, db in dbs.items()},
            "sizes": {"runs": [small_n, large_n], "steps_per_run": STEPS_PER_RUN, "rounds": rounds, "repeats": repeats},
            "seconds": time.monotonic() - started,
            "method": (
                "Django test Client in the bench process (DEBUG off), a logged-in operator; the two databases "
                "alternate per round after a warm-up; per repeat p95 over the list pages' fetches at each size, "
                "ratio paired per repeat, median with min-max. Query counts and EXPLAIN from one captured fetch "
                "per page and size."
            ),
        }
    )


# --- the databases --------------------------------------------------------------------------------------------


def _fingerprint() -> str:
    """The seeded tables' shape: a model change (a new column) means seeding again."""
    from runs.models import Run, Step

    cols = [f"{m._meta.db_table}.{f.column}" for m in (Run, Step) for f in m._meta.concrete_fields]
    return hashlib.sha256(",".join(cols).encode()).hexdigest()[:16]


class Database:
    """One seeded database, reachable as Django's `default` connection inside `active()`."""

    def __init__(self, env: BenchEnv, label: str, runs: int):
        from django.db import connections

        self.env = env
        self.label = label
        self.runs = runs
        self.name = f"{env.database_name}_dash_{label}"
        self.alias = f"bench_dash_{label}"
        connections.settings[self.alias] = {**copy.deepcopy(connections.settings["default"]), "NAME": self.name}
        self.pages: dict[str, str] = {}
        self.client: Any = None
        self.seeding: dict[str, Any] = {}

    def close(self) -> None:
        from django.db import connections

        with contextlib.suppress(Exception):
            connections[self.alias].close()

    @contextlib.contextmanager
    def active(self):
        """Point `default` (what views, the ORM and CaptureQueriesContext use) at this database."""
        from django.db import connections

        original = connections["default"]
        connections["default"] = connections[self.alias]
        try:
            yield
        finally:
            connections["default"] = original

    def _server(self):
        import psycopg

        from bench.harness import url_with_database

        return psycopg.connect(url_with_database(self.env.database_url, "postgres"), autocommit=True)

    def prepare(self) -> None:
        from django.core.management import call_command
        from django.db import connections

        wanted = {"runs": self.runs, "steps_per_run": STEPS_PER_RUN, "fingerprint": _fingerprint()}
        with self._server() as server:
            exists = server.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.name]).fetchone()
            if not exists:
                server.execute(f'CREATE DATABASE "{self.name}"')
        call_command("migrate", database=self.alias, verbosity=0, interactive=False)
        conn = connections[self.alias]
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS bench_seed (doc jsonb NOT NULL)")
            cur.execute("SELECT doc FROM bench_seed")
            row = cur.fetchone()
        have = row[0] if row else None
        if isinstance(have, str):
            have = json.loads(have)
        if have == wanted:
            log(f"dashboard: {self.name} already holds {self.runs:,} runs")
            self.seeding = {"reused": True}
        else:
            if have is not None and have.get("fingerprint") != wanted["fingerprint"]:
                # The models changed under an old seed: start from an empty database of the current schema.
                conn.close()
                with self._server() as server:
                    server.execute(f'DROP DATABASE "{self.name}" WITH (FORCE)')
                    server.execute(f'CREATE DATABASE "{self.name}"')
                call_command("migrate", database=self.alias, verbosity=0, interactive=False)
                with conn.cursor() as cur:
                    cur.execute("CREATE TABLE IF NOT EXISTS bench_seed (doc jsonb NOT NULL)")
            self.seeding = _seed(conn, self.runs)
            with conn.cursor() as cur:
                cur.execute("DELETE FROM bench_seed")
                cur.execute("INSERT INTO bench_seed VALUES (%s::jsonb)", [json.dumps(wanted)])
        with self.active():
            self._login_and_pick_pages()

    def _login_and_pick_pages(self) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group
        from django.test import Client

        from runs.models import Run
        from runs.ops.audit import roles_ensure

        user, _ = get_user_model().objects.get_or_create(username="bench-operator")
        roles_ensure()
        user.groups.add(Group.objects.get(name="operator"))
        self.client = Client(SERVER_NAME="localhost")
        self.client.force_login(user)
        ids = Run.objects.order_by("-id").values_list("id", flat=True)
        deep = ids[int(self.runs * 0.9)]
        middle = ids[self.runs // 2]
        self.pages = {
            "list_first": "/",
            "list_status": "/?status=failed",
            "list_deep": f"/?cursor={deep}",
            "detail": f"/runs/{middle}/",
            "detail_2000": f"/runs/{_long_run()}/",
        }

    def fetch(self, page: str) -> float:
        t0 = time.perf_counter()
        response = self.client.get(self.pages[page])
        ms = (time.perf_counter() - t0) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{self.pages[page]} answered {response.status_code} on {self.name}")
        return ms

    def fetch_all(self) -> dict[str, float]:
        return {page: self.fetch(page) for page in self.pages}

    def capture(self, page: str) -> list[str]:
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as captured:
            self.fetch(page)
        return [q["sql"] for q in captured.captured_queries]


# The run page of a long run: 2,000 steps. Its id is the smallest UUIDv7 there is, so it sorts last in the run
# list and moves none of the list pages.
LONG_RUN_ID = "00000000-0000-7000-8000-000000002000"
LONG_RUN_STEPS = 2_000


def _long_run() -> str:
    """The id of the 2,000-step run, made (once per database) through the ORM."""
    from datetime import timedelta

    from django.utils import timezone

    from runs.models import Run, Step, StepStatus

    t0 = timezone.now() - timedelta(days=30)
    run, _ = Run.objects.get_or_create(
        pk=LONG_RUN_ID,
        defaults={"task_id": "bench-long", "status": "completed", "started_at": t0, "finished_at": t0},
    )
    if Step.objects.filter(run=run).count() < LONG_RUN_STEPS:
        Step.objects.filter(run=run).delete()
        Step.objects.bulk_create(
            Step(
                run=run,
                seq=i,
                key=f"s{i}",
                status=StepStatus.COMPLETED,
                started_at=t0 + timedelta(milliseconds=10 * i),
                finished_at=t0 + timedelta(milliseconds=10 * i + 5),
                output=i,
            )
            for i in range(LONG_RUN_STEPS)
        )
    return LONG_RUN_ID


def _defaults(model: Any, explicit: set[str]) -> tuple[list[str], list[Any]]:
    """Columns the seeding SQL doesn't set, with the model's defaults as parameters: a field another change
    adds to the model (NOT NULL with a Python-side default) doesn't break the seeding."""
    from django.db import connection

    columns, params = [], []
    for field in model._meta.concrete_fields:
        if field.column in explicit or (field.null and not field.has_default()):
            continue
        columns.append(connection.ops.quote_name(field.column))
        params.append(field.get_db_prep_save(field.get_default(), connection))
    return columns, params


RUN_COLUMNS = ["id", "task_id", "status", "payload", "tags", "created_at", "started_at", "finished_at", "executions"]
TASKS = "ARRAY['bench-noop', 'research-agent', 'summarise', 'code-review', 'support-triage']"
# Run i was created (N - i) * SPAN/N seconds ago; its id is a UUIDv7 of that instant (48-bit milliseconds,
# version 7, 12 bits of i, variant, i), so ids are time-ordered like the ones the app makes.
RUN_SELECT = """
    SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' || lpad(to_hex(i %% 4096), 3, '0')
            || '8' || lpad(to_hex(i), 15, '0'))::uuid,
           ({tasks})[1 + i %% 5],
           CASE WHEN i %% 10 = 0 THEN 'failed' WHEN i %% 50 = 1 THEN 'waiting' WHEN i %% 50 = 3 THEN 'canceled'
                ELSE 'completed' END,
           jsonb_build_object('n', i),
           ARRAY['batch-' || (i %% 100)]::varchar[],
           ts, ts, CASE WHEN i %% 50 = 1 THEN NULL ELSE ts + make_interval(secs => i %% 17) END, 1
      FROM (SELECT i, now() - make_interval(secs => ({runs} - i) * {step}) AS ts
              FROM generate_series(1, {runs}) AS i) AS g
"""
STEP_COLUMNS = ["run_id", "seq", "key", "kind", "status", "started_at", "finished_at", "output"]
STEP_SELECT = """
    SELECT r.id, s, 's' || s, 'step', 'completed', r.started_at + make_interval(secs => s * 0.01),
           r.started_at + make_interval(secs => s * 0.01 + 0.005), to_jsonb(s)
      FROM runs_run AS r CROSS JOIN generate_series(0, {steps} - 1) AS s
"""


def _seed(conn: Any, runs: int) -> dict[str, Any]:
    from runs.models import Run, Step

    started = time.monotonic()
    log(f"dashboard: seeding {runs:,} runs and {runs * STEPS_PER_RUN:,} steps into {conn.settings_dict['NAME']}")
    with conn.cursor() as cur:
        cur.execute("TRUNCATE runs_run CASCADE")
        for model, columns, select in (
            (Run, RUN_COLUMNS, RUN_SELECT.format(tasks=TASKS, runs=runs, step=SPAN_SECONDS / runs)),
            (Step, STEP_COLUMNS, STEP_SELECT.format(steps=STEPS_PER_RUN)),
        ):
            explicit = set(columns) | ({"id"} if model is Step else set())
            extra, params = _defaults(model, explicit)
            marks = "".join(", %s" for _ in extra)
            cur.execute(
                f"INSERT INTO {model._meta.db_table} ({', '.join(columns + extra)})"
                f" SELECT q.*{marks} FROM ({select}) AS q",
                params,
            )
    seeded = time.monotonic() - started
    # VACUUM can't run in a transaction: Django's connection is in autocommit outside atomic().
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE runs_run")
        cur.execute("VACUUM ANALYZE runs_step")
    log(f"dashboard: seeded in {seeded:.1f} s (+ VACUUM ANALYZE {time.monotonic() - started - seeded:.1f} s)")
    return {"reused": False, "seconds": seeded, "vacuum_analyze_seconds": time.monotonic() - started - seeded}


# --- reading the queries --------------------------------------------------------------------------------------

# A COUNT is bounded over a LIMITed subquery (the capped counters) or one run's rows (its steps, logs, children).
_BOUNDED_COUNT = re.compile(r'\blimit \d+|"run_id" = |"parent_id" = |"id" >= |run_id = ', re.IGNORECASE)


def _inspect(sqls: list[str]) -> dict[str, list[str]]:
    """COUNTs over runs/steps that aren't bounded, and plans that read a whole runs/steps table."""
    from django.db import connection

    unbounded = [
        _head(s)
        for s in sqls
        if "count(" in s.lower() and ("runs_run" in s or "runs_step" in s) and not _BOUNDED_COUNT.search(s)
    ]
    scans = []
    with connection.cursor() as cur:
        for sql in sqls:
            if not sql.lstrip().upper().startswith("SELECT") or "runs_" not in sql:
                continue
            cur.execute("EXPLAIN (FORMAT JSON) " + sql)
            plan = cur.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            if _unlimited_seq_scan(plan[0]["Plan"], limited=False):
                scans.append(_head(sql))
    return {"unbounded_counts": unbounded, "full_scans": scans}


def _unlimited_seq_scan(node: dict[str, Any], *, limited: bool) -> bool:
    limited = limited or node["Node Type"] == "Limit"
    if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in ("runs_run", "runs_step") and not limited:
        return True
    return any(_unlimited_seq_scan(child, limited=limited) for child in node.get("Plans", []))


def _head(sql: str) -> str:
    return " ".join(sql.split())[:160]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def _list_p95(repeat: dict[str, list[float]]) -> float:
    return _pct([x for page in LIST_PAGES for x in repeat[page]], 95)
