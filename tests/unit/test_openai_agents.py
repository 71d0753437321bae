"""run_agent: an OpenAI Agents SDK agent whose model calls, tool calls and handoffs are Dex steps, in-process
(run_task) against the local OpenAI-compatible server."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

import tests.openai_agent_tasks  # noqa: F401  (registers the Agents SDK tasks)
from runs import realtime
from runs.ai.cassettes import CassetteMismatch
from runs.models import RunStatus, StepChunk
from runs.testing import run_task
from tests.agents import ledger_lines

pytestmark = pytest.mark.django_db

TRIP_STEPS = ["trip:model", "trip:lookup_order", "trip:model#1", "trip:get_weather", "trip:model#2", "trip:advise"]


@pytest.fixture
def llm(settings, monkeypatch):
    from runs.ai.testserver import serve_in_thread

    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        yield server
    finally:
        server.stop()


def test_each_model_call_and_tool_call_is_a_step(llm, tmp_path):
    ledger = tmp_path / "ledger"
    with realtime.capture() as events:
        run = run_task("t-oa-trip", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED, run.error
    assert [s.key for s in run.steps.order_by("seq")] == [*TRIP_STEPS, "trip:model#3"]
    assert ledger_lines(ledger) == ["lookup_order", "get_weather", "advise"]
    assert llm.stats()["requests"] == 4
    assert run.output["output"] == "Tool advise returned: pack sunglasses"
    models = run.steps.filter(kind="ai").order_by("seq")
    assert all(s.meta["usage"]["input_tokens"] > 0 for s in models)
    assert run.cost_usd == sum(Decimal(s.meta["usage"]["cost_usd"]) for s in models) > 0
    request = models[1].meta["exchange"]["request"]
    assert request["model"] == "gpt-5-mini" and [t["name"] for t in request["tools"]] == [
        "lookup_order",
        "get_weather",
        "advise",
    ]
    # The final answer streamed to the run page piece by piece, and was stored.
    tokens = [e.data["text"] for e in events if e.kind == "token" and e.data.get("key") == "trip:model#3"]
    assert len(tokens) > 1 and "".join(tokens) == run.output["output"]
    chunks = StepChunk.objects.filter(run=run, step_key="trip:model#3").order_by("seq")
    assert "".join(c.text for c in chunks) == run.output["output"]


def test_a_run_config_without_a_provider_of_its_own_keeps_dexs_routing(llm, tmp_path):
    run = run_task("t-oa-trip", {"ledger": str(tmp_path / "ledger"), "workflow": "trips"})
    assert run.status == RunStatus.COMPLETED, run.error  # the local server answered, not OpenAI
    assert llm.stats()["requests"] == 4


def test_a_failed_tool_retries_without_asking_the_model_again(llm, tmp_path):
    ledger = tmp_path / "ledger"
    run = run_task("t-oa-trip", {"ledger": str(ledger), "prompt": "plan my trip for order A-7 [flaky]"})
    assert run.status == RunStatus.COMPLETED, run.error
    # advise failed once: the step retried and the run executed again from the top, replaying the model.
    assert ledger_lines(ledger) == ["lookup_order", "get_weather", "advise", "advise"]
    assert llm.stats()["requests"] == 4
    assert run.steps.get(key="trip:advise").attempts == 2


def test_a_handoff_is_a_step_and_the_run_resumes_past_it(llm, tmp_path):
    ledger = tmp_path / "ledger"
    run = run_task("t-oa-triage", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED, run.error
    assert [s.key for s in run.steps.order_by("seq")] == [
        "triage:model",
        "triage:handoff:billing",
        "billing:model",
        "billing:refund",
        "billing:model#1",
        "after",
    ]
    assert run.output["agent"] == "billing"
    assert run.steps.get(key="triage:handoff:billing").output == {"agent": "billing"}
    # "after" failed once, so the run executed twice: the handoff, the refund and the model ran once.
    assert ledger_lines(ledger) == ["refund", "after", "after"]
    assert llm.stats()["requests"] == 3


def test_an_async_task_awaits_arun_agent(llm, tmp_path):
    run = run_task("t-oa-trip-async", {"ledger": str(tmp_path / "ledger")})
    assert run.status == RunStatus.COMPLETED, run.error
    assert [s.key for s in run.steps.order_by("seq")] == [*TRIP_STEPS, "trip:model#3"]


def test_a_cassette_replays_with_no_call_and_a_changed_prompt_fails_with_the_diff(llm, tmp_path):
    from django.core.management import call_command

    first = run_task("t-oa-trip", {"ledger": str(tmp_path / "ledger")})
    call_command("dex", "cassette", "export", str(first.pk), "-o", str(tmp_path / "trip.json"))
    llm.reset()
    replayed = run_task("t-oa-trip", {"ledger": str(tmp_path / "ledger2")}, cassette=tmp_path / "trip.json")
    assert replayed.status == RunStatus.COMPLETED, replayed.error
    assert replayed.output == first.output and llm.stats()["requests"] == 0
    with pytest.raises(CassetteMismatch) as failure:
        run_task(
            "t-oa-trip", {"ledger": str(tmp_path / "l3"), "prompt": "a trip for B-2"}, cassette=tmp_path / "trip.json"
        )
    assert "LLM request #1 (step 'trip:model')" in str(failure.value)
    assert '+      "content": "a trip for B-2"' in str(failure.value)


def test_an_mcp_tool_call_is_a_step_that_never_runs_twice(settings, tmp_path, monkeypatch):
    from runs.ai.testserver import serve_in_thread

    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    ledger = tmp_path / "ledger"
    call = {"name": "record_visit", "arguments": {"ledger": str(ledger), "city": "Lisbon"}}
    server, base_url = serve_in_thread(script={"rules": [{"calls": 1, "tool_calls": [call]}]})
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        run = run_task("t-oa-mcp", {"ledger": str(ledger)})
    finally:
        server.stop()
    assert run.status == RunStatus.COMPLETED, run.error
    assert [s.key for s in run.steps.order_by("seq")] == [
        "travel:model",
        "travel:record_visit",
        "travel:model#1",
        "after",
    ]
    # The run executed twice ("after" failed once); the MCP tool and the model were asked once each.
    assert ledger_lines(ledger) == ["mcp record_visit Lisbon", "after", "after"]
    assert server.stats()["requests"] == 2
    assert "visit to Lisbon recorded" in json.dumps(run.steps.get(key="travel:record_visit").output)
