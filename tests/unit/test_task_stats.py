"""LLM spend on the dashboard (issue #5): each run's cost on the run list, and per-task stats on the Tasks page and
a task's page (runs, success rate, p50 duration, LLM cost and tokens), over the last 24 hours, in bounded queries."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from runs import selectors
from runs.ids import uuid7_floor
from runs.models import Run, RunStatus, Step, StepKind, StepStatus
from runs.ops.audit import roles_ensure

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer() -> Client:
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    roles_ensure()
    user.groups.add(Group.objects.get(name="viewer"))
    client = Client()
    client.force_login(user)
    return client


def llm_step(run: Run, seq: int, input_tokens: int, output_tokens: int, cost: str) -> Step:
    usage = {"model": "gpt-5-mini", "input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost}
    return Step.objects.create(
        run=run,
        key=f"ask-{seq}",
        seq=seq,
        kind=StepKind.AI,
        status=StepStatus.COMPLETED,
        started_at=timezone.now(),
        finished_at=timezone.now(),
        meta={"usage": usage},
    )


def agent_runs() -> list[Run]:
    """Three runs of t-llm-chain in the last 24 hours (two LLM steps each in the first two), and one from two days
    ago that the stats leave out."""
    now = timezone.now()
    runs = []
    for seconds, status, cost in ((4, RunStatus.COMPLETED, "0.0125"), (2, RunStatus.COMPLETED, "0.0075")):
        run = Run.objects.create(
            task_id="t-llm-chain", status=status, started_at=now - timedelta(seconds=seconds), finished_at=now
        )
        Run.objects.filter(pk=run.pk).update(cost_usd=Decimal(cost))
        llm_step(run, 0, 100, 20, "0.005")
        llm_step(run, 1, 50, 30, "0.0025")
        runs.append(run)
    runs.append(Run.objects.create(task_id="t-llm-chain", status=RunStatus.FAILED, started_at=now, finished_at=now))
    two_days_ago = now - timedelta(days=2)
    old = Run.objects.create(id=uuid7_floor(two_days_ago), task_id="t-llm-chain", status=RunStatus.COMPLETED)
    Run.objects.filter(pk=old.pk).update(created_at=two_days_ago, cost_usd=Decimal("9"))
    Step.objects.create(
        run=old,
        key="ask",
        seq=0,
        kind=StepKind.AI,
        status=StepStatus.COMPLETED,
        finished_at=two_days_ago,
        meta={"usage": {"input_tokens": 1000, "output_tokens": 1000, "cost_usd": "9"}},
    )
    return runs


def test_task_stats_count_the_last_24_hours_with_cost_and_tokens(django_assert_max_num_queries: Any) -> None:
    agent_runs()

    with django_assert_max_num_queries(2):
        stats = selectors.task_stats(["t-llm-chain", "t-typed"])

    llm = stats["t-llm-chain"]
    assert (llm.runs, llm.finished, llm.failed) == (3, 3, 1)
    assert llm.success_percent == "67%" and llm.failure_percent == "33%"
    assert llm.p50_seconds == 3.0  # of the completed runs: 4 s and 2 s
    assert llm.cost_usd == Decimal("0.02")
    assert (llm.input_tokens, llm.output_tokens, llm.tokens) == (300, 100, 400)
    assert "t-typed" not in stats  # no runs: the page shows zeros
    assert selectors.task_stats([]) == {}


def test_the_tasks_page_shows_cost_and_tokens_per_task(viewer: Client, django_assert_max_num_queries: Any) -> None:
    agent_runs()

    with django_assert_max_num_queries(6):
        page = viewer.get("/tasks/").content.decode()

    row = page.split('href="/tasks/t-llm-chain/"', 1)[1].split("</tr>", 1)[0]
    assert ">3</a>" in row
    assert re.search(r'<td class="num task-cost">\$0\.0200</td>', row)
    assert re.search(r'<td class="num task-tokens" title="300 in / 100 out">400</td>', row)
    assert "67%" in row and "33%" in row
    detail = viewer.get("/tasks/t-llm-chain/").content.decode()
    assert "<dt>LLM cost</dt><dd>$0.0200</dd>" in detail and "400 <span" in detail


def test_the_run_list_shows_each_runs_llm_cost(viewer: Client) -> None:
    first, second, failed = agent_runs()
    Run.objects.filter(pk=second.pk).update(saved_usd=Decimal("0.005"))

    page = viewer.get("/").content.decode()

    def cost_cell(run: Run) -> str:
        row = page.split(f'<tr id="run-{run.pk}"', 1)[1].split("</tr>", 1)[0]
        return row.split('class="num run-cost">', 1)[1].split("</td>", 1)[0]

    assert cost_cell(first).endswith(">$0.0125</span>")
    assert "$0.0050 saved" in cost_cell(second)
    assert cost_cell(failed) == "—"
