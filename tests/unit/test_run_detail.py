"""The run page: what it shows (and keeps inert), who may act on the run, each action through the page with
and without htmx, its audit entry, the JSON downloads, and a bounded number of queries for a long run."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone

from runs.models import (
    AuditEntry,
    LogLine,
    Run,
    RunStatus,
    Step,
    StepChunk,
    StepKind,
    StepStatus,
    Waitpoint,
    WaitpointKind,
)
from runs.templatetags.dex_run import JSON_PREVIEW_CHARS
from runs.web import fragments

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def viewer() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user("viewer", password="pw-viewer-123"))
    return client


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    # The "operator" group comes with a data migration, which a transactional test's flush removes.
    group, _ = Group.objects.get_or_create(name="operator")
    group.permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    user.groups.add(group)
    client = Client()
    client.force_login(user)
    return client


def make_run(**fields: Any) -> Run:
    fields.setdefault("task_id", "t-typed")
    fields.setdefault("status", RunStatus.RUNNING)
    fields.setdefault("payload", {"name": "ada"})
    return Run.objects.create(**fields)


def make_step(run: Run, key: str, seq: int, **fields: Any) -> Step:
    now = timezone.now()
    fields.setdefault("status", StepStatus.COMPLETED)
    fields.setdefault("started_at", now)
    fields.setdefault("finished_at", now + timedelta(seconds=1))
    return Step.objects.create(run=run, key=key, seq=seq, **fields)


def page(client: Client, run: Run, step: str = "") -> str:
    response = client.get(f"/runs/{run.pk}/", {"step": step} if step else {})
    assert response.status_code == 200
    return response.content.decode()


# --- what the page shows ------------------------------------------------------------------------------------


def test_it_shows_the_header_viewers_and_a_timeline_with_bars_scaled_to_durations(viewer: Client) -> None:
    start = timezone.now() - timedelta(seconds=10)
    parent = make_run(status=RunStatus.COMPLETED)
    run = make_run(
        status=RunStatus.COMPLETED,
        parent=parent,
        output={"answer": 42},
        started_at=start,
        finished_at=start + timedelta(seconds=10),
        executions=2,
        cost_usd="0.0123",
    )
    child = make_run(parent=run, task_id="t-child")
    short = make_step(run, "short", 0, started_at=start, finished_at=start + timedelta(seconds=2))
    long = make_step(
        run, "long", 1, started_at=start + timedelta(seconds=2), finished_at=start + timedelta(seconds=10), output="ok"
    )

    html = page(viewer, run)

    assert "Completed" in html and "$0.0123" in html and "<dt>Attempts</dt><dd>2" in html
    assert f'href="/runs/{parent.pk}/"' in html and f'href="/runs/{child.pk}/"' in html and "t-child" in html
    assert "&quot;answer&quot;: 42" in html
    assert f'href="/runs/{run.pk}/payload.json"' in html and f'href="/runs/{run.pk}/output.json"' in html
    assert 'style="left:0.0%;width:20.0%"' in html  # short: the first 2 s of 10
    assert 'style="left:20.0%;width:80.0%"' in html  # long: the other 8
    assert f'id="step-{short.pk}"' in html and f'id="step-{long.pk}"' in html
    assert f'href="/runs/{run.pk}/steps/{long.pk}/output.json"' in page(viewer, run, step="long")


def test_a_step_shows_its_attempts_logs_metadata_and_llm_usage(viewer: Client) -> None:
    run = make_run(status=RunStatus.FAILED)
    make_step(
        run,
        "ask",
        0,
        kind=StepKind.AI,
        output={"text": "The answer", "model": "m-1"},
        meta={"usage": {"model": "m-1", "input_tokens": 12, "output_tokens": 34, "cost_usd": "0.0002"}},
    )
    make_step(
        run,
        "bad",
        1,
        status=StepStatus.FAILED,
        attempts=2,
        error={"type": "ValueError", "message": "second", "traceback": "Traceback (bad 2)"},
        history=[
            {"attempt": 1, "error": {"type": "ValueError", "message": "first", "traceback": "Traceback (bad 1)"}},
            {"attempt": 2, "error": {"type": "ValueError", "message": "second", "traceback": "Traceback (bad 2)"}},
        ],
    )
    LogLine.objects.create(run=run, step_key="bad", ts=timezone.now(), message="about to fail")

    html = page(viewer, run, step="bad")  # the inspector, opened by its link

    assert "Traceback (bad 1)" in html and "Traceback (bad 2)" in html and "2 failed attempts" in html
    assert html.count("about to fail") == 2  # in the run's logs and in the step's inspector
    html = page(viewer, run, step="ask")
    assert '<pre class="llm-text">The answer</pre>' in html
    assert "12 in / 34 out" in html and "Answered by <strong>m-1</strong>" in html


def test_step_output_with_a_script_or_a_javascript_link_renders_inert(viewer: Client) -> None:
    evil = "<script>alert(1)</script> [click](javascript:alert(2)) <img src=x onerror=alert(3)>"
    run = make_run(status=RunStatus.COMPLETED, payload={"topic": evil}, output={"text": evil}, metadata={"m": evil})
    make_step(run, "ask", 0, kind=StepKind.AI, output={"text": evil}, meta={"note": evil})
    LogLine.objects.create(run=run, ts=timezone.now(), message=evil)
    Waitpoint.objects.create(run=run, step_key="ok?", kind=WaitpointKind.APPROVAL, token="t1", prompt=evil)

    html = page(viewer, run)

    assert "<script>alert" not in html and "<img src=x" not in html
    assert 'href="javascript:' not in html and "href='javascript:" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_large_values_are_truncated_with_a_link_to_download_them_whole(viewer: Client) -> None:
    big = {"blob": "x" * (JSON_PREVIEW_CHARS * 2)}
    run = make_run(status=RunStatus.COMPLETED, payload=big)
    step = make_step(run, "big", 0, output=big)

    html = page(viewer, run, step="big")

    assert "x" * (JSON_PREVIEW_CHARS * 2) not in html
    assert html.count("Truncated: only the beginning is shown") == 2
    response = viewer.get(f"/runs/{run.pk}/payload.json")
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-payload.json"'
    assert json.loads(response.content) == big
    assert json.loads(viewer.get(f"/runs/{run.pk}/steps/{step.pk}/output.json").content) == big


def test_downloads_are_for_logged_in_users_and_only_for_the_runs_own_steps(client: Client, viewer: Client) -> None:
    run, other = make_run(output=[1, 2]), make_run()
    step = make_step(other, "s", 0)
    assert client.get(f"/runs/{run.pk}/output.json").status_code == 302
    assert json.loads(viewer.get(f"/runs/{run.pk}/output.json").content) == [1, 2]
    assert viewer.get(f"/runs/{run.pk}/steps/{step.pk}/output.json").status_code == 404


def test_a_streaming_llm_step_shows_its_text_so_far(viewer: Client) -> None:
    run = make_run()
    StepChunk.objects.create(run=run, step_key="draft", attempt=1, seq=0, text="failed attempt ")
    StepChunk.objects.create(run=run, step_key="draft", attempt=2, seq=0, text="Hello, ")
    StepChunk.objects.create(run=run, step_key="draft", attempt=2, seq=1, text="<b>world</b>")

    html = page(viewer, run)

    pending = fragments.step_dom_id(fragments.PendingStep(key="draft"))
    assert f'id="{pending}"' in html
    assert f'<pre id="{pending}-tokens" class="tokens autoscroll">Hello, &lt;b&gt;world&lt;/b&gt;</pre>' in html
    assert "failed attempt" not in html


def test_the_page_costs_a_bounded_number_of_queries_for_a_long_run(
    operator: Client, django_assert_max_num_queries: Any
) -> None:
    run = make_run(started_at=timezone.now())
    Step.objects.bulk_create(
        Step(run=run, key=f"s{i}", seq=i, status=StepStatus.COMPLETED, output=i, started_at=timezone.now())
        for i in range(500)
    )
    LogLine.objects.bulk_create(LogLine(run=run, ts=timezone.now(), message=f"line {i}") for i in range(2000))
    for _ in range(30):
        make_run(parent=run)
    Waitpoint.objects.create(
        run=run, step_key="ok?", kind=WaitpointKind.APPROVAL, token="t2", form="tests.forms.RefundForm"
    )

    with django_assert_max_num_queries(8):
        html = page(operator, run)

    assert "300 earlier steps not shown" in html and 'data-key="s499"' in html and 'data-key="s299"' not in html
    assert "1500 earlier log lines not shown" in html and "line 1999" in html and "line 1499<" not in html
    assert "30 in all; the first 20 are shown" in html
    assert 'name="wp' in html and "-amount" in html


# --- who may act --------------------------------------------------------------------------------------------


def test_viewers_see_no_action_buttons_and_operators_do(viewer: Client, operator: Client) -> None:
    run = make_run(status=RunStatus.FAILED)
    make_step(run, "s", 0)
    Waitpoint.objects.create(run=run, step_key="ok?", kind=WaitpointKind.APPROVAL, token="t3", prompt="Ship it?")

    seen = page(viewer, run)
    for action in ("cancel", "retry", "replay", "fork", "complete"):
        assert f"/{action}/" not in seen
    assert "Ship it?" in seen and "Approve" not in seen

    acted = page(operator, run, step="s")
    for action in ("retry", "replay", "fork", "complete"):
        assert f"/{action}/" in acted
    assert "Retry from failed step" in acted and "Approve" in acted and "Reject" in acted
    assert f"/runs/{run.pk}/cancel/" not in acted  # a failed run has nothing to cancel


@pytest.mark.parametrize("action", ["cancel", "retry", "replay", "steps/{step}/fork", "waitpoints/{wp}/complete"])
def test_a_forged_post_from_a_viewer_is_forbidden(viewer: Client, action: str) -> None:
    run = make_run(status=RunStatus.WAITING)
    step = make_step(run, "s", 0)
    wp = Waitpoint.objects.create(run=run, step_key="ok?", kind=WaitpointKind.APPROVAL, token="t4")
    url = f"/runs/{run.pk}/{action.format(step=step.pk, wp=wp.pk)}/"

    response = viewer.post(url, {"decision": "approve", "payload": "{}"})

    assert response.status_code == 403
    assert Run.objects.count() == 1 and Run.objects.get().status == RunStatus.WAITING
    assert not AuditEntry.objects.exists()
    assert Waitpoint.objects.get().completed_at is None


def test_anonymous_posts_go_to_the_login_page(client: Client) -> None:
    run = make_run()
    response = client.post(f"/runs/{run.pk}/cancel/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


# --- the actions --------------------------------------------------------------------------------------------


def audit_actions() -> list[tuple[str, str, list]]:
    return [(a.username, a.action, a.run_ids) for a in AuditEntry.objects.order_by("id")]


def test_cancel_without_js_redirects_and_is_audited(operator: Client) -> None:
    run = make_run(status=RunStatus.WAITING)

    response = operator.post(f"/runs/{run.pk}/cancel/")

    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELED
    assert audit_actions() == [("operator", "cancel", [run.pk])]
    assert "Canceled." in operator.get(response["Location"]).content.decode()


def test_retry_with_htmx_answers_the_regions_the_socket_pushes(operator: Client) -> None:
    run = make_run(status=RunStatus.FAILED, error={"type": "E", "message": "m"})
    make_step(run, "bad", 0, status=StepStatus.FAILED)

    response = operator.post(f"/runs/{run.pk}/retry/", **HTMX)

    assert response.status_code == 200
    html = response.content.decode()
    assert f'id="run-{run.pk}-header" class="card run-header" hx-swap-oob="true"' in html
    assert 'data-run-header data-status="queued"' in html
    assert f'id="run-{run.pk}-output"' in html and "status-queued" in html
    assert f'id="run-{run.pk}-notice"' in html and "Retrying from the failed step." in html
    assert f"/runs/{run.pk}/cancel/" in html  # a queued run can be canceled
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED
    assert audit_actions() == [("operator", "retry", [run.pk])]


def test_an_action_the_run_refuses_says_why_and_is_not_audited(operator: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)

    html = operator.post(f"/runs/{run.pk}/retry/", **HTMX).content.decode()
    assert "notice-error" in html and "only a failed, timed-out or canceled run can be retried" in html

    response = operator.post(f"/runs/{run.pk}/cancel/", follow=True)
    assert "has already finished" in response.content.decode()
    assert not AuditEntry.objects.exists()


def test_replay_with_an_edited_payload_starts_a_linked_run(operator: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)

    response = operator.post(f"/runs/{run.pk}/replay/", {"payload": '{"name": "grace", "count": 2}'}, **HTMX)

    new = Run.objects.exclude(pk=run.pk).get()
    assert response.status_code == 200 and response["HX-Redirect"] == f"/runs/{new.pk}/"
    assert new.replay_of_id == run.pk and new.payload["name"] == "grace" and new.payload["count"] == 2
    entry = AuditEntry.objects.get()
    assert entry.action == "replay" and entry.run_ids == [run.pk, new.pk] and entry.detail["payload_edited"]


def test_replay_without_js_and_an_unchanged_payload(operator: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    response = operator.post(f"/runs/{run.pk}/replay/", {"payload": json.dumps(run.payload)})
    new = Run.objects.exclude(pk=run.pk).get()
    assert response.status_code == 302 and response["Location"] == f"/runs/{new.pk}/"
    assert new.payload["name"] == "ada" and not AuditEntry.objects.get().detail["payload_edited"]


@pytest.mark.parametrize(
    ("payload", "says"),
    [("{nope", "isn&#x27;t valid JSON"), ("[1]", "must be a JSON object"), ('{"count": "many"}', "doesn&#x27;t fit")],
)
def test_replay_refuses_a_bad_payload(operator: Client, payload: str, says: str) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    html = operator.post(f"/runs/{run.pk}/replay/", {"payload": payload}, **HTMX).content.decode()
    assert says in html
    assert Run.objects.count() == 1 and not AuditEntry.objects.exists()


def test_fork_from_a_step_with_the_previous_output_edited(operator: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    make_step(run, "plan", 0, output={"plan": "old"})
    act = make_step(run, "act", 1, output="done")

    response = operator.post(f"/runs/{run.pk}/steps/{act.pk}/fork/", {"output": '{"plan": "new"}'})

    fork = Run.objects.exclude(pk=run.pk).get()
    assert response["Location"] == f"/runs/{fork.pk}/"
    assert [(s.key, s.output) for s in fork.steps.order_by("seq")] == [("plan", {"plan": "new"})]
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.detail["step"], entry.detail["output_edited"]) == ("fork", "act", True)


def test_fork_from_the_first_step_cannot_edit_an_earlier_output(operator: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    first = make_step(run, "plan", 0)
    html = operator.post(f"/runs/{run.pk}/steps/{first.pk}/fork/", {"output": "1"}, **HTMX).content.decode()
    assert "there is no earlier output to edit" in html and Run.objects.count() == 1


def test_an_approval_is_answered_inline_with_its_forms_fields(operator: Client) -> None:
    run = make_run(status=RunStatus.WAITING)
    wp = Waitpoint.objects.create(
        run=run, step_key="refund", kind=WaitpointKind.APPROVAL, token="t5", form="tests.forms.RefundForm"
    )
    prefix = fragments.approval_form_prefix(wp.pk)
    assert f'name="{prefix}-amount"' in page(operator, run)
    url = f"/runs/{run.pk}/waitpoints/{wp.pk}/complete/"

    html = operator.post(url, {"decision": "approve", f"{prefix}-amount": "-1"}, **HTMX).content.decode()
    assert "the approval&#x27;s form data is invalid" in html and "amount" in html
    assert Waitpoint.objects.get().completed_at is None

    fields = {f"{prefix}-amount": "12.50", f"{prefix}-reason": "damaged", "comment": "ok"}
    html = operator.post(url, {"decision": "approve", **fields}, **HTMX).content.decode()
    assert "Approved." in html and f'id="waitpoint-{wp.pk}"' not in html
    wp.refresh_from_db()
    assert wp.result == {
        "approved": True,
        "by": "operator",
        "comment": "ok",
        "data": {"amount": "12.50", "reason": "damaged"},
    }
    assert Run.objects.get().status == RunStatus.QUEUED
    assert audit_actions() == [("operator", "approve", [run.pk])]

    again = operator.post(url, {"decision": "reject"}, follow=True).content.decode()
    assert "already completed" in again


def test_a_rejection_needs_no_form_fields(operator: Client) -> None:
    run = make_run(status=RunStatus.WAITING)
    wp = Waitpoint.objects.create(
        run=run, step_key="refund", kind=WaitpointKind.APPROVAL, token="t6", form="tests.forms.RefundForm"
    )
    response = operator.post(f"/runs/{run.pk}/waitpoints/{wp.pk}/complete/", {"decision": "reject", "comment": "no"})
    assert response.status_code == 302
    wp.refresh_from_db()
    assert wp.result["approved"] is False and wp.result["comment"] == "no"
    assert audit_actions() == [("operator", "reject", [run.pk])]


# --- the same regions, pushed over the run's socket ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("persona", ["viewer", "operator"])
def test_pushed_regions_carry_actions_only_for_operators_and_a_new_attempt_clears_its_tokens(
    request: pytest.FixtureRequest, persona: str
) -> None:
    import time

    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from dexweb.asgi import application
    from runs import realtime

    client: Client = request.getfixturevalue(persona)
    run = make_run()
    StepChunk.objects.create(run=run, step_key="draft", attempt=1, seq=0, text="so far")
    pending = fragments.step_dom_id(fragments.PendingStep(key="draft"))
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def receive_until(comm: WebsocketCommunicator, needle: str) -> str:
        deadline = time.monotonic() + 10
        while True:
            message = await comm.receive_from(timeout=max(deadline - time.monotonic(), 0.01))
            if needle in message:
                return message

    async def scenario() -> None:
        comm = WebsocketCommunicator(
            application,
            f"/ws/runs/{run.pk}/",
            headers=[(b"origin", b"http://127.0.0.1"), (b"cookie", cookie.encode())],
        )
        connected, _ = await comm.connect()
        assert connected
        try:
            snapshot = await comm.receive_from(timeout=10)
            assert (f"/runs/{run.pk}/cancel/" in snapshot) == (persona == "operator")
            assert f'<pre id="{pending}-tokens" class="tokens autoscroll">so far</pre>' in snapshot
            realtime.publish_now(realtime.RunEvent("token", str(run.pk), {"key": "draft", "reset": True, "attempt": 2}))
            html = await receive_until(comm, f"{pending}-tokens")
            assert html == f'<pre id="{pending}-tokens" class="tokens autoscroll" hx-swap-oob="true"></pre>'
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()
