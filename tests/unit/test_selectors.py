"""Reads: the run list's keyset pagination and filters, one run with its steps."""

from __future__ import annotations

import pytest

from runs import selectors
from runs.models import Run, RunStatus, Step, StepStatus

pytestmark = pytest.mark.django_db


def make_runs(n: int, **fields) -> list[Run]:
    runs = [Run.objects.create(task_id="t-typed", payload={"name": "x"}, **fields) for _ in range(n)]
    return sorted(runs, key=lambda r: r.id, reverse=True)


def test_it_walks_every_run_exactly_once_page_by_page() -> None:
    runs = make_runs(7)
    seen, cursor = [], None
    while True:
        page = selectors.run_list(limit=3, cursor=cursor)
        seen += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [r.id for r in seen] == [r.id for r in runs]


def test_it_has_no_next_page_when_the_last_page_is_exactly_full() -> None:
    make_runs(3)
    page = selectors.run_list(limit=3)
    assert len(page.items) == 3
    assert page.next_cursor is None


def test_it_caps_the_page_size() -> None:
    make_runs(3)
    assert len(selectors.run_list(limit=0).items) == 1
    assert selectors.run_list(limit=10_000).next_cursor is None


def test_it_combines_filters() -> None:
    (tagged,) = make_runs(1, status=RunStatus.FAILED, tags=["a", "b"])
    make_runs(1, status=RunStatus.FAILED, tags=["a"])
    make_runs(1, status=RunStatus.COMPLETED, tags=["b"])
    page = selectors.run_list(statuses=[RunStatus.FAILED], tag="b", task_id="t-typed")
    assert [r.id for r in page.items] == [tagged.id]


def test_it_refuses_a_cursor_it_never_gave() -> None:
    with pytest.raises(selectors.InvalidCursor):
        selectors.run_list(cursor="page-2")


def test_it_gets_a_run_with_its_steps_in_order() -> None:
    (run,) = make_runs(1)
    Step.objects.create(run=run, seq=1, key="b", status=StepStatus.COMPLETED)
    Step.objects.create(run=run, seq=0, key="a", status=StepStatus.COMPLETED)
    got = selectors.run_get_with_steps(run_id=run.id)
    assert [s.key for s in got.steps.all()] == ["a", "b"]
    with pytest.raises(Run.DoesNotExist):
        selectors.run_get(run_id="0190b5a0-0000-7000-8000-000000000000")
