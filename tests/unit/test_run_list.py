"""The Runs list (`/`): filters, search, keyset pagination, capped per-status counters, a bounded number of
queries; bulk actions (dry run, then act) and their audit log (`/audit/`); viewers read, operators act."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs import selectors, services
from runs.ids import uuid7_floor
from runs.models import AuditEntry, Run, RunStatus, Step, StepStatus
from runs.ops.audit import Actor
from runs.selectors import RunListFilters
from runs.web import fragments
from runs.web.consumers import RunListConsumer
from tests.conftest import persona

pytestmark = pytest.mark.django_db


def make_run(**fields: Any) -> Run:
    fields.setdefault("task_id", "t-typed")
    fields.setdefault("status", RunStatus.COMPLETED)
    fields.setdefault("payload", {"name": "x"})
    return Run.objects.create(**fields)


def row_ids(page: str) -> list[str]:
    return re.findall(r'<tr id="run-([0-9a-f-]{36})"', page)


# --- access ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("get", "/"), ("get", "/audit/"), ("post", "/runs/bulk/")])
def test_it_sends_anonymous_visitors_to_the_login_page(client: Client, method: str, path: str) -> None:
    response = getattr(client, method)(path)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={path}"


def test_a_viewer_reads_but_sees_no_action_buttons_and_cannot_post(viewer: Client) -> None:
    run = make_run(status=RunStatus.FAILED)
    page = viewer.get("/").content.decode()
    assert f'id="run-{run.pk}"' in page
    assert 'id="bulk-form"' not in page and 'name="run_ids"' not in page and "Retry…" not in page

    response = viewer.post("/runs/bulk/", {"action": "retry", "run_ids": [run.pk], "confirm": "1"})
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert not AuditEntry.objects.exists()
    assert viewer.get("/audit/").status_code == 200  # the audit log is for everyone to read


def test_an_operator_sees_the_bulk_form_and_a_checkbox_per_row(operator: Client) -> None:
    run = make_run()
    page = operator.get("/").content.decode()
    assert 'id="bulk-form"' in page
    assert f'name="run_ids" value="{run.pk}" form="bulk-form"' in page
    assert 'hx-headers=\'{"x-csrftoken": "' in page


# --- filters, search, pagination ---------------------------------------------------------------------------------


def test_it_filters_by_status_task_tag_and_date(viewer: Client) -> None:
    failed = make_run(status=RunStatus.FAILED, tags=["eu"])
    queued = make_run(status=RunStatus.QUEUED, task_id="t-ten-steps", tags=["us"])
    # Made 10 days ago: its uuid7 id carries that instant too (the date filter uses the id index).
    ten_days_ago = timezone.now() - timedelta(days=10)
    old = make_run(status=RunStatus.FAILED, id=uuid7_floor(ten_days_ago))
    Run.objects.filter(pk=old.pk).update(created_at=ten_days_ago)

    def shown(query: str) -> set[str]:
        return set(row_ids(viewer.get(f"/?{query}").content.decode()))

    assert shown("status=failed") == {str(failed.pk), str(old.pk)}
    assert shown("status=failed&status=queued") == {str(failed.pk), str(old.pk), str(queued.pk)}
    assert shown("task=t-ten-steps") == {str(queued.pk)}
    assert shown("tag=eu") == {str(failed.pk)}
    since = (timezone.localdate() - timedelta(days=2)).isoformat()
    assert shown(f"status=failed&created_after={since}") == {str(failed.pk)}
    until = (timezone.localdate() - timedelta(days=5)).isoformat()
    assert shown(f"created_before={until}") == {str(old.pk)}
    assert shown("created_after=not-a-date") == {str(failed.pk), str(old.pk), str(queued.pk)}
    assert "No runs match these filters." in viewer.get("/?tag=nowhere").content.decode()


def test_it_finds_a_run_by_id_or_by_idempotency_key(viewer: Client) -> None:
    keyed = make_run(idempotency_key="order-42")
    other = make_run()
    assert row_ids(viewer.get(f"/?q={other.pk}").content.decode()) == [str(other.pk)]
    assert row_ids(viewer.get("/?q=order-42").content.decode()) == [str(keyed.pk)]
    assert row_ids(viewer.get("/?q=+order-4+").content.decode()) == []


def test_it_pages_with_a_cursor_keeping_the_filter_and_only_the_first_page_is_live(viewer: Client) -> None:
    runs = sorted((make_run(status=RunStatus.FAILED) for _ in range(fragments.RUN_LIST_LIMIT + 5)), key=lambda r: r.pk)
    make_run(status=RunStatus.COMPLETED)
    first = viewer.get("/?status=failed")
    page = first.content.decode()
    assert row_ids(page) == [str(r.pk) for r in reversed(runs[-fragments.RUN_LIST_LIMIT :])]
    assert 'ws-connect="/ws/runs/?status=failed"' in page
    cursor = first.context["next_cursor"]
    link = f"/?status=failed&amp;cursor={cursor}"
    assert f'href="{link}"' in page and f'hx-get="{link}"' in page  # every hx-get keeps its href

    second = viewer.get(f"/?status=failed&cursor={cursor}").content.decode()
    assert row_ids(second) == [str(r.pk) for r in reversed(runs[:5])]
    assert "ws-connect" not in second and 'rel="next"' not in second
    assert viewer.get("/?cursor=page-2").status_code == 400


def test_an_htmx_request_gets_only_the_list_region(viewer: Client) -> None:
    run = make_run()
    page = viewer.get("/?status=completed", headers={"HX-Request": "true"}).content.decode()
    assert page.lstrip().startswith('<section id="runs-live"')
    assert f'id="run-{run.pk}"' in page and "<html" not in page and 'id="run-counters"' not in page


def test_the_counters_count_each_status_up_to_a_cap(viewer: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        make_run(status=RunStatus.FAILED)
    make_run(status=RunStatus.RUNNING)
    counts = {c.status: c.count for c in selectors.run_status_counts()}
    assert counts[RunStatus.FAILED] == 3 and counts[RunStatus.RUNNING] == 1 and counts[RunStatus.QUEUED] == 0

    monkeypatch.setattr(selectors, "RUN_COUNT_CAP", 2)
    page = viewer.get("/").content.decode()
    counter = re.search(r'id="count-failed">(.*?)</a>', page, re.S)
    assert counter and "<b>2+</b>" in counter.group(1)
    assert "<b>1</b>" in re.search(r'id="count-running">(.*?)</a>', page, re.S).group(1)  # type: ignore[union-attr]
    assert 'href="/?status=failed"' in page


def test_the_list_costs_a_bounded_number_of_queries_and_never_counts_the_whole_table(
    operator: Client, django_assert_max_num_queries: Any
) -> None:
    now = timezone.now()
    statuses = list(RunStatus)
    runs = Run.objects.bulk_create(
        Run(task_id=f"task-{i % 7}", status=statuses[i % len(statuses)], tags=[f"tag-{i % 5}"]) for i in range(400)
    )
    Step.objects.bulk_create(
        Step(run=run, seq=seq, key=f"s{seq}", status=StepStatus.COMPLETED, started_at=now, finished_at=now)
        for run in runs[:100]
        for seq in range(5)
    )
    for query in ("", "?status=failed&status=queued&task=task-3", "?tag=tag-2&created_after=2000-01-01", "?q=x"):
        with django_assert_max_num_queries(8), CaptureQueriesContext(connection) as captured:
            response = operator.get(f"/{query}")
        assert response.status_code == 200
        for statement in (q["sql"] for q in captured.captured_queries):
            # Every count is a capped one: a COUNT over a LIMITed subquery, never COUNT(*) over runs_run.
            assert statement.upper().count("COUNT(") <= statement.upper().count("LIMIT"), statement
            assert "runs_step" not in statement
    with django_assert_max_num_queries(8):
        operator.get("/?status=failed", headers={"HX-Request": "true"})


# --- bulk actions ----------------------------------------------------------------------------------------------


def test_a_bulk_retry_of_a_selection_shows_a_dry_run_then_acts_and_is_audited(
    operator: Client, operator_user: Any
) -> None:
    failed = [make_run(status=RunStatus.FAILED) for _ in range(3)]
    done = make_run(status=RunStatus.COMPLETED)
    selection = [r.pk for r in failed] + [done.pk]

    dry = operator.post("/runs/bulk/", {"action": "retry", "scope": "selection", "run_ids": selection})
    page = dry.content.decode()
    assert dry.status_code == 200 and "<html" in page  # without htmx: a whole page
    assert "Retry 3 runs" in page and "of the 4 selected" in page
    assert 'name="confirm" value="1"' in page
    assert Run.objects.filter(status=RunStatus.FAILED).count() == 3  # the dry run changed nothing
    assert not AuditEntry.objects.exists()

    confirmed = operator.post(
        "/runs/bulk/",
        {"action": "retry", "scope": "selection", "run_ids": selection, "confirm": "1"},
        headers={"HX-Request": "true"},
    )
    html = confirmed.content.decode()
    assert confirmed.status_code == 200 and "<html" not in html and 'id="bulk-result"' in html
    assert "3 runs done" in html
    assert set(Run.objects.filter(pk__in=[r.pk for r in failed]).values_list("status", flat=True)) == {"queued"}
    done.refresh_from_db()
    assert done.status == RunStatus.COMPLETED

    entry = AuditEntry.objects.get()
    assert entry.user == operator_user and entry.username == "operator"
    assert entry.action == "bulk_retry"
    assert set(entry.run_ids) == {r.pk for r in failed}
    assert entry.detail["scope"] == "selection" and entry.detail["count"] == 3


def test_a_bulk_cancel_by_filter_acts_only_on_what_the_dry_run_counted(operator: Client) -> None:
    matching = [make_run(status=RunStatus.QUEUED, tags=["batch"]) for _ in range(2)]
    make_run(status=RunStatus.QUEUED, tags=["other"])
    make_run(status=RunStatus.COMPLETED, tags=["batch"])  # matches the filter but can't be canceled
    form = {"action": "cancel", "scope": "filter", "tag": "batch"}

    dry = operator.post("/runs/bulk/", form, headers={"HX-Request": "true"}).content.decode()
    assert "Cancel 2 runs" in dry and "matching the filter" in dry
    assert 'name="tag" value="batch"' in dry
    upto = re.search(r'name="upto" value="([0-9a-f-]+)"', dry).group(1)  # type: ignore[union-attr]

    late = make_run(status=RunStatus.QUEUED, tags=["batch"])  # created after the dry run
    operator.post("/runs/bulk/", {**form, "confirm": "1", "upto": upto}, headers={"HX-Request": "true"})

    assert {r.status for r in Run.objects.filter(pk__in=[r.pk for r in matching])} == {RunStatus.CANCELED}
    late.refresh_from_db()
    assert late.status == RunStatus.QUEUED
    entry = AuditEntry.objects.get()
    assert entry.action == "bulk_cancel" and entry.detail["filters"] == {"tag": "batch", "top_level": True}
    assert set(entry.run_ids) == {r.pk for r in matching}


def test_a_bulk_replay_starts_linked_runs_and_respects_its_limit(
    operator_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(services.BULK_LIMITS, "replay", 2)
    originals = [make_run(status=RunStatus.FAILED, task_id="t-typed", tags=["r"]) for _ in range(3)]
    filters = RunListFilters(tag="r")

    preview = services.runs_bulk_preview(action="replay", filters=filters)
    assert preview.count == 3 and preview.over_limit and preview.will_act_on == 2

    result = services.runs_bulk_apply(by=Actor.web(operator_user), action="replay", filters=filters, upto=preview.upto)
    newest_two = sorted(originals, key=lambda r: r.pk)[-2:]
    assert set(result.done) == {r.pk for r in newest_two}
    assert set(Run.objects.filter(pk__in=result.created).values_list("replay_of_id", flat=True)) == {
        r.pk for r in newest_two
    }
    assert result.entry is not None and result.entry.detail["created"] == [str(pk) for pk in result.created]


def test_bulk_services_refuse_non_operators_and_malformed_requests(operator_user: Any) -> None:
    from django.core.exceptions import PermissionDenied

    viewer = persona("viewer")
    with pytest.raises(PermissionDenied):
        services.runs_bulk_apply(by=Actor.web(viewer), action="retry", run_ids=[])
    with pytest.raises(services.BulkError):
        services.runs_bulk_apply(by=Actor.web(operator_user), action="retry", run_ids=[], filters=RunListFilters())
    with pytest.raises(services.BulkError):
        services.runs_bulk_apply(by=Actor.web(operator_user), action="delete", run_ids=[])  # type: ignore[arg-type]


def test_a_bulk_request_with_nothing_selected_says_so(operator: Client) -> None:
    page = operator.post("/runs/bulk/", {"action": "cancel", "scope": "selection"}).content.decode()
    assert "Select runs first" in page and 'name="confirm"' not in page
    assert operator.post("/runs/bulk/", {"action": "explode"}).status_code == 400


# --- the audit log ---------------------------------------------------------------------------------------------


def test_the_audit_log_pages_newest_first(viewer: Client) -> None:
    run = make_run()
    entries = [AuditEntry.objects.create(username="op", action=f"action-{i}", run_ids=[run.pk]) for i in range(55)]
    first = viewer.get("/audit/")
    page = first.content.decode()
    shown = re.findall(r'<tr id="audit-(\d+)"', page)
    assert shown == [str(e.pk) for e in reversed(entries)][:50]
    assert f'href="/run/{run.pk}/"' not in page and f'href="/runs/{run.pk}/"' in page
    link = f"/audit/?before={first.context['next_before']}"
    assert f'href="{link}"' in page and f'hx-get="{link}"' in page

    rest = viewer.get(link, headers={"HX-Request": "true"}).content.decode()
    assert re.findall(r'<tr id="audit-(\d+)"', rest) == [str(e.pk) for e in reversed(entries)][50:]
    assert "<html" not in rest and "audit-more" not in rest


# --- the live list -----------------------------------------------------------------------------------------------


def test_a_filtered_live_list_adds_matching_runs_and_drops_runs_that_stop_matching() -> None:
    consumer = RunListConsumer()
    consumer.filters = RunListFilters(statuses=(RunStatus.FAILED,))
    consumer.shown = []
    run = Run(pk=uuid.uuid4(), task_id="t", status=RunStatus.QUEUED, created_at=timezone.now())

    assert consumer._place(run) == []  # doesn't match: not shown
    run.status = RunStatus.FAILED
    assert any('hx-swap-oob="beforeend:#run-rows"' in html for html in consumer._place(run))
    assert consumer.shown == [run.pk]
    run.status = RunStatus.QUEUED  # retried: no longer failed
    assert consumer._place(run) == [f'<tr id="run-{run.pk}" hx-swap-oob="delete"></tr>']
    assert consumer.shown == []


def test_an_operators_pushed_rows_carry_the_checkbox() -> None:
    consumer = RunListConsumer()
    consumer.shown = []
    consumer.is_operator = True
    run = Run(pk=uuid.uuid4(), task_id="t", status=RunStatus.QUEUED, created_at=timezone.now())
    assert any('name="run_ids"' in html for html in consumer._place(run))


@pytest.mark.django_db(transaction=True)
def test_the_socket_sends_the_filtered_first_page_then_the_counters() -> None:
    failed, queued = make_run(status=RunStatus.FAILED), make_run(status=RunStatus.QUEUED)
    client = Client()
    client.force_login(persona("viewer"))
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def scenario() -> None:
        from dexweb.asgi import application

        headers = [(b"origin", b"http://127.0.0.1"), (b"cookie", cookie.encode())]
        comm = WebsocketCommunicator(application, "/ws/runs/?status=failed", headers=headers)
        connected, _ = await comm.connect()
        assert connected
        try:
            rows = await comm.receive_from(timeout=10)
            assert f'id="run-{failed.pk}"' in rows and f'id="run-{queued.pk}"' not in rows
            assert 'name="run_ids"' not in rows  # a viewer's rows: no checkbox
            counters = await comm.receive_from(timeout=10)
            assert 'id="run-counters" class="counters"' in counters and 'hx-swap-oob="true"' in counters
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()
