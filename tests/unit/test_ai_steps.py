"""ctx.ai.infer as a durable step, through the real openai SDK and the local OpenAI-compatible server."""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.request import urlopen

import pytest

from runs import realtime, services
from runs.models import Run, RunStatus, StepChunk, Waitpoint
from runs.ops.audit import Actor
from runs.testing import drive, run_task
from tests.agents import ledger_lines

pytestmark = pytest.mark.django_db


@pytest.fixture
def llm(settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        yield base_url
    finally:
        server.stop()


def requests_made(base_url: str) -> int:
    with urlopen(base_url.removesuffix("/v1") + "/_stats") as response:
        return json.load(response)["requests"]


def test_it_records_tokens_cost_and_model_on_the_step_and_sums_cost_on_the_run(llm):
    run = run_task("t-llm-chain", {"topic": "durable agents"})
    assert run.status == RunStatus.COMPLETED, run.error
    steps = {s.key: s for s in run.steps.all()}
    usage = steps["plan"].meta["usage"]
    assert usage["model"] == "gpt-5-mini" and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    total = sum(Decimal(s.meta["usage"]["cost_usd"]) for s in steps.values())
    assert total > 0 and run.cost_usd == total
    assert requests_made(llm) == 3


def test_a_429_then_success_is_retried_and_billed_once(llm):
    run = run_task("t-llm-chain", {"topic": "x", "fail_last": "[[fail: 429 x1]]"})
    assert run.status == RunStatus.COMPLETED
    final = run.steps.get(key="final").meta["usage"]
    assert [a["ok"] for a in final["attempts"]] == [False, True]
    assert final["attempts"][0]["status"] == 429
    assert requests_made(llm) == 4  # three calls, one of them twice
    assert run.cost_usd == sum(Decimal(s.meta["usage"]["cost_usd"]) for s in run.steps.all())


def test_failover_to_the_second_model_is_recorded(llm):
    run = run_task("t-llm-failover", {})
    assert run.output == "claude-haiku"
    usage = run.steps.get(key="ask").meta["usage"]
    assert usage["model"] == "claude-haiku"
    assert {a["model"] for a in usage["attempts"] if not a["ok"]} == {"gpt-5-mini"}


def test_a_retried_run_makes_exactly_one_new_llm_call_and_records_the_saving(llm):
    # The last call fails on every attempt of its first execution (1 try + 2 retries), then succeeds.
    run = run_task("t-llm-chain", {"topic": "y", "fail_last": "[[fail: 500 x3]]"})
    assert run.status == RunStatus.FAILED and run.error["step"] == "final"
    before = requests_made(llm)
    services.run_retry(run=run, by=Actor.system("tests"))
    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert requests_made(llm) - before == 1
    reused = sum(Decimal(run.steps.get(key=k).meta["usage"]["cost_usd"]) for k in ("plan", "draft"))
    assert reused > 0 and run.saved_usd == reused


def test_an_identical_call_in_a_replay_hits_the_cache(llm):
    first = run_task("t-llm-chain", {"topic": "z"})
    before = requests_made(llm)
    replay = drive(services.run_replay(run=first, by=Actor.system("tests")))
    assert replay.status == RunStatus.COMPLETED and replay.output == first.output
    assert requests_made(llm) == before
    assert all(s.meta["usage"]["cached"] for s in replay.steps.all())
    assert replay.cost_usd == 0 and replay.saved_usd == first.cost_usd


def test_a_budget_cap_parks_the_run_in_an_approval(llm):
    run = Run.objects.create(task_id="t-llm-budget", payload={})
    from runs import engine

    with engine.enqueue_to(lambda run_id: None):
        engine.run_execute(run.id, heartbeat=False)
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING
    approval = Waitpoint.objects.get(run=run)
    assert approval.prompt.startswith("Budget exceeded — continue with +$")
    assert requests_made(llm) == 0  # nothing was spent before someone said yes
    services.waitpoint_complete(token=approval.token, data={"approved": True}, by=Actor.system("tests"))
    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert requests_made(llm) == 1


def test_streamed_tokens_are_pushed_live_and_stored_as_they_arrive(llm):
    with realtime.capture() as events:
        run = run_task("t-llm-chain", {"topic": "streaming works well", "stream": True})
    tokens = [e.data["text"] for e in events if e.kind == "token" and e.data.get("key") == "draft"]
    draft = run.steps.get(key="draft").output["text"]
    assert len(tokens) > 1 and "".join(tokens) == draft
    stored = "".join(StepChunk.objects.filter(run=run, step_key="draft").values_list("text", flat=True))
    assert stored == draft


def test_the_tool_loop_records_each_turn_and_tool_call_as_a_step(llm, monkeypatch, ledger):
    monkeypatch.setenv("DEX_TEST_TOOL_LEDGER", str(ledger))
    run = run_task("t-llm-tools", {"question": 'where is my order? [[tool: lookup_order {"order_id": "A-9"}]]'})
    assert run.status == RunStatus.COMPLETED, run.error
    assert list(run.steps.values_list("key", flat=True)) == ["support:turn", "support:lookup_order", "support:turn#1"]
    assert run.steps.get(key="support:lookup_order").output == {"order": "A-9", "status": "shipped"}
    assert "shipped" in run.output
    # Executing the finished run's code again asks nothing and runs no tool again.
    before = requests_made(llm)
    Run.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED)
    assert drive(run).output == run.output
    assert requests_made(llm) == before
    assert ledger_lines(ledger) == ["lookup A-9"]


def test_the_usage_page_shows_cost_by_task_and_day(llm, client, django_user_model, django_assert_max_num_queries):
    run_task("t-llm-chain", {"topic": "usage page"})
    client.force_login(django_user_model.objects.create_user("viewer-u", password="pw-viewer-123"))
    with django_assert_max_num_queries(6):
        response = client.get("/usage/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "t-llm-chain" in page
    total = Run.objects.get(task_id="t-llm-chain").cost_usd
    assert f"${total:.4f}" in page
