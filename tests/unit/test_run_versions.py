"""The run page's status regions carry the version of the read they were rendered from (runs.web.fragments
READ_VERSION_SQL), so the browser can drop a region older than the one it shows (static/js/dex.js; the e2e test
`test_an_older_header_never_replaces_a_newer_one` checks the browser side)."""

from __future__ import annotations

import re

import pytest

from runs.models import Run, RunStatus
from runs.web import fragments

pytestmark = pytest.mark.django_db


def older(incoming: str, current: str) -> bool:
    """static/js/dex.js `olderThan`: a lower xmax, or the same xmax with more transactions still in progress."""
    (a_xmax, a_busy), (b_xmax, b_busy) = (tuple(map(int, v.split("-"))) for v in (incoming, current))
    return a_xmax < b_xmax or (a_xmax == b_xmax and a_busy > b_busy)


def header_version(html: str, run: Run) -> str:
    match = re.search(rf'<section id="run-{run.pk}-header"[^>]* data-version="(\d+-\d+)"', html)
    assert match, html[:500]
    return match.group(1)


@pytest.mark.django_db(transaction=True)  # each write commits, as the engine's and the views' do
def test_a_region_read_before_a_change_is_older_than_one_read_after() -> None:
    run = Run.objects.create(task_id="t-typed", status=RunStatus.QUEUED)
    before = fragments.run_detail_get_or_none(run.pk)
    html_before = fragments.render_run_status(before)

    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    after = fragments.run_detail_get_or_none(run.pk)
    html_after = fragments.render_run_status(after)

    assert after.status == RunStatus.RUNNING
    assert older(header_version(html_before, run), header_version(html_after, run))
    assert not older(header_version(html_after, run), header_version(html_before, run))
    # Reading again without a change is never "older": the same state may replace itself.
    again = fragments.run_detail_get_or_none(run.pk)
    assert not older(again.version, after.version)


def test_the_page_and_the_output_region_carry_the_version_too(client: object) -> None:
    run = Run.objects.create(task_id="t-typed", status=RunStatus.COMPLETED, output={"ok": True})
    context = fragments.run_detail_context(run.pk)
    snapshot = fragments.render_run_snapshot(context)

    version = context["run"].version
    assert re.fullmatch(r"\d+-\d+", version)
    assert f'id="run-{run.pk}-header" class="card run-header" hx-swap-oob="true" data-version="{version}"' in snapshot
    assert f'id="run-{run.pk}-output" class="card" hx-swap-oob="true" data-version="{version}"' in snapshot
