"""The run page as a trace view (DESIGN.md §6): its stable hooks, one time axis for every row, each attempt its
own segment, waits drawn as waits, child runs nested, the step inspector addressable as ?step=<key>, actions
offered only where they make sense, and a bounded number of queries for a 2,000-step run."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone

from runs.models import Run, RunStatus, Step, StepKind, StepStatus

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    group, _ = Group.objects.get_or_create(name="operator")
    group.permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    user.groups.add(group)
    client = Client()
    client.force_login(user)
    return client


def make_run(**fields: Any) -> Run:
    fields.setdefault("task_id", "t-typed")
    fields.setdefault("status", RunStatus.COMPLETED)
    return Run.objects.create(**fields)


def get(client: Client, url: str, **extra: Any) -> str:
    response = client.get(url, **extra)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def row(html: str, key: str) -> str:
    """The trace row of step `key` (up to the next row)."""
    match = re.search(
        rf'<div id="step-[^"]+" class="step [^"]*" data-key="{re.escape(key)}".*?(?=<div id="step-|$)', html, re.S
    )
    assert match, f"no row for {key}"
    return match.group(0)


def test_it_has_the_header_and_timeline_hooks_with_one_axis_for_every_row(operator: Client) -> None:
    start = timezone.now() - timedelta(seconds=10)
    run = make_run(started_at=start, finished_at=start + timedelta(seconds=10), code_version="v-abc", queue="")
    Step.objects.create(
        run=run, key="a", seq=0, status="completed", started_at=start, finished_at=start + timedelta(seconds=5)
    )
    Step.objects.create(
        run=run,
        key="b",
        seq=1,
        status="completed",
        started_at=start + timedelta(seconds=5),
        finished_at=start + timedelta(seconds=10),
    )

    html = get(operator, f"/runs/{run.pk}/")

    assert "data-run-header" in html and "data-run-duration" in html and "10.0 s" in html
    assert re.search(r'data-run-steps-completed data-base="2">2<', html)
    # A run with no queue of its own shows the queue the workers consume (a session fixture may have moved it).
    assert "v-abc" in html and f'<dd class="mono">{settings.DEX_DEFAULT_QUEUE}</dd>' in html
    assert "data-timeline" in html and html.count("data-track") == 2 and html.count("data-bar") == 2
    # Both rows on one axis: the same 10 s, a tick label at its end.
    assert 'style="left:0.0%;width:50.0%"' in row(html, "a") and 'style="left:50.0%;width:50.0%"' in row(html, "b")
    assert ">10.0 s</span>" in html and "data-step-inspector" in html


def test_each_attempt_is_its_own_segment_with_the_back_off_between_them(operator: Client) -> None:
    t0 = timezone.now() - timedelta(seconds=10)
    run = make_run(started_at=t0, finished_at=t0 + timedelta(seconds=10))

    def attempt(n: int, begin: float, end: float) -> dict[str, Any]:
        return {
            "attempt": n,
            "started_at": (t0 + timedelta(seconds=begin)).isoformat(),
            "finished_at": (t0 + timedelta(seconds=end)).isoformat(),
            "error": {"type": "ValueError", "message": f"boom {n}", "traceback": f"Traceback {n}"},
        }

    Step.objects.create(
        run=run,
        key="flaky",
        seq=0,
        status="completed",
        attempts=3,
        history=[attempt(1, 0, 1), attempt(2, 3, 4)],
        started_at=t0 + timedelta(seconds=8),
        finished_at=t0 + timedelta(seconds=10),
    )

    flaky = row(get(operator, f"/runs/{run.pk}/"), "flaky")

    segments = re.findall(r'data-attempt="(\d)" data-status="(\w+)"', flaky)
    assert segments == [("1", "failed"), ("2", "failed"), ("3", "completed")]
    assert flaky.count("data-backoff") == 2  # 1 s → 3 s and 4 s → 8 s: the gaps are drawn
    assert "attempt 1 failed: ValueError: boom 1" in flaky and "×3" in flaky


def test_a_wait_is_drawn_as_a_wait_with_its_deadline_and_offers_no_fork(operator: Client) -> None:
    t0 = timezone.now() - timedelta(seconds=5)
    run = make_run(status=RunStatus.WAITING, started_at=t0)
    Step.objects.create(
        run=run, key="prep", seq=0, status="completed", started_at=t0, finished_at=t0 + timedelta(seconds=1)
    )
    deadline = timezone.now() + timedelta(hours=1)
    Step.objects.create(
        run=run,
        key="nap",
        seq=1,
        kind=StepKind.SLEEP,
        status=StepStatus.WAITING,
        started_at=t0 + timedelta(seconds=1),
        wake_at=deadline,
    )

    html = get(operator, f"/runs/{run.pk}/")
    nap = row(html, "nap")

    assert 'class="seg seg-wait seg-waiting" data-attempt="1" data-status="waiting"' in nap
    assert f'data-deadline="{int(deadline.timestamp() * 1000)}"' in nap and "sleeping until" in nap
    assert "seg-completed" not in nap and 'data-end=""' in nap  # open: it grows with the clock, not full green
    napping = get(operator, f"/runs/{run.pk}/", data={"step": "nap"})
    assert "Fork from this step" not in napping
    assert 'hx-trigger="every 2s"' in napping  # the inspector of an unsettled step refreshes itself
    assert "Fork from this step" in get(operator, f"/runs/{run.pk}/", data={"step": "prep"})
    assert 'data-confirm="Cancel this run?' in html  # the cancel of a live run asks first


def test_a_canceled_run_offers_resume_not_retry_from_failed_step(operator: Client) -> None:
    run = make_run(status=RunStatus.CANCELED)
    html = get(operator, f"/runs/{run.pk}/")
    assert "Resume canceled run" in html and "Retry from failed step" not in html
    assert f"/runs/{run.pk}/cancel/" not in html


def test_child_runs_are_nested_under_the_step_that_started_them_and_expand(operator: Client) -> None:
    t0 = timezone.now() - timedelta(seconds=4)
    run = make_run(started_at=t0, finished_at=timezone.now())
    child = make_run(parent=run, task_id="t-child", started_at=t0)
    Step.objects.create(
        run=child, key="inner", seq=0, status="completed", started_at=t0, finished_at=t0 + timedelta(seconds=1)
    )
    Step.objects.create(
        run=run,
        key="fan",
        seq=0,
        kind=StepKind.MAP,
        status="completed",
        started_at=t0,
        finished_at=timezone.now(),
        meta={"children": [str(child.pk)]},
    )

    fan = row(get(operator, f"/runs/{run.pk}/"), "fan")
    assert f'data-run-id="{child.pk}"' in fan and "t-child" in fan and f'hx-get="/runs/{child.pk}/trace/"' in fan
    assert f'href="/runs/{child.pk}/"' in fan

    trace = get(operator, f"/runs/{child.pk}/trace/", **HTMX)
    assert 'data-step-key="inner"' in trace and "data-attempt" in trace


def test_the_inspector_is_a_region_for_htmx_and_a_deep_link_without_js(operator: Client) -> None:
    run = make_run()
    Step.objects.create(
        run=run, key="s 1", seq=0, status="failed", error={"type": "KeyError", "message": "nope", "traceback": "TB"}
    )

    region = get(operator, f"/runs/{run.pk}/step/?step=s+1", **HTMX)
    assert region.startswith(f'\n<aside id="run-{run.pk}-inspector"') and "<html" not in region
    assert 'data-inspected-key="s 1"' in region and "KeyError" in region and "TB" in region

    assert 'data-inspected-key="s 1"' in get(operator, f"/runs/{run.pk}/step/?step=s+1")  # without htmx: the page
    assert 'href="?step=s%201"' in get(operator, f"/runs/{run.pk}/")
    assert "No step <code>nope</code>" in get(operator, f"/runs/{run.pk}/?step=nope")


def test_a_2000_step_run_page_renders_in_at_most_8_queries(
    operator: Client, django_assert_max_num_queries: Any
) -> None:
    t0 = timezone.now() - timedelta(minutes=5)
    run = make_run(status=RunStatus.RUNNING, started_at=t0)
    Step.objects.bulk_create(
        Step(
            run=run,
            key=f"s{i}",
            seq=i,
            status=StepStatus.COMPLETED,
            output={"i": i},
            started_at=t0 + timedelta(milliseconds=100 * i),
            finished_at=t0 + timedelta(milliseconds=100 * i + 90),
        )
        for i in range(2000)
    )

    with django_assert_max_num_queries(8):
        html = get(operator, f"/runs/{run.pk}/", data={"step": "s1999"})

    assert 'data-run-steps-completed data-base="2000"' in html
    assert 'data-inspected-key="s1999"' in html and 'data-key="s1999"' in html
    assert "1800 earlier steps not shown" in html
    # A step older than the ones drawn opens in the inspector at the same cost, and is not drawn.
    with django_assert_max_num_queries(8):
        html = get(operator, f"/runs/{run.pk}/", data={"step": "s5"})
    assert 'data-inspected-key="s5"' in html and "Completed" in html and 'data-key="s5"' not in html
    assert html.count('class="step step-') == 200


def test_the_run_list_nests_child_runs_under_their_parent(operator: Client) -> None:
    parent = make_run(task_id="t-parent", code_version="v-123")
    child = make_run(task_id="t-child", parent=parent)

    html = get(operator, "/")
    assert f'id="run-{parent.pk}"' in html and f'id="run-{child.pk}"' not in html
    assert "1 child run<" in html and f'hx-get="/runs/{parent.pk}/children/"' in html
    assert f">{parent.pk}</a>" in html and "v-123" in html  # the full id, and the version column

    nested = get(operator, f"/runs/{parent.pk}/children/", **HTMX)
    assert f'data-run-id="{child.pk}"' in nested and "t-child" in nested
    # Looking for it (by id, or by its task) finds the child on its own.
    assert f'id="run-{child.pk}"' in get(operator, f"/?q={child.pk}")
    assert f'id="run-{child.pk}"' in get(operator, "/?task=t-child")
