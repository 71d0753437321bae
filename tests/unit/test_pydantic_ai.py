"""DexAgent: a Pydantic AI agent whose model requests and tool calls are Dex steps, in-process (run_task)
against the local OpenAI-compatible server."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

import tests.framework_agents  # noqa: F401  (registers the framework tasks)
from runs import realtime
from runs.ai.cassettes import CassetteMismatch
from runs.models import RunStatus, StepChunk
from runs.testing import run_task
from tests.agents import ledger_lines
from tests.framework_agents import FINAL, trip_agent, trip_script

pytestmark = pytest.mark.django_db

TRIP_STEPS = [
    "trip:model",
    "trip:lookup_order",
    "trip:model#1",
    "trip:get_weather",
    "trip:model#2",
    "trip:advise",
    "trip:model#3",
]


@pytest.fixture
def llm(settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread(script=trip_script())
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        yield server
    finally:
        server.stop()


def test_each_model_request_and_tool_call_is_a_step(llm, tmp_path):
    ledger = tmp_path / "ledger"
    run = run_task("t-pai-trip", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["advice"] == FINAL  # the structured output, validated into TripAdvice
    assert [s.key for s in run.steps.order_by("seq")] == TRIP_STEPS
    assert ledger_lines(ledger) == ["lookup_order A-7", "get_weather Lisbon", "advise 21C sunny"]
    assert llm.stats()["requests"] == 4
    model_steps = run.steps.filter(kind="ai").order_by("seq")
    usage = model_steps[0].meta["usage"]
    assert usage["model"] == "gpt-5-mini" and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert run.cost_usd == sum(Decimal(s.meta["usage"]["cost_usd"]) for s in model_steps) > 0
    assert run.steps.get(key="trip:get_weather").output == {"outcome": "return", "value": "Lisbon: 21C sunny"}
    exchange = model_steps[3].meta["exchange"]
    assert exchange["api"] == "pydantic-ai" and exchange["request"]["model"] == "openai:gpt-5-mini"
    # The recorded request leaves out what changes on every execution.
    for message in exchange["request"]["messages"]:
        assert not {"timestamp", "run_id", "conversation_id"} & set(message)
        assert all("timestamp" not in part for part in message["parts"])


def test_a_failed_tool_retries_without_asking_the_model_again_and_model_retry_is_an_outcome(llm, tmp_path):
    ledger = tmp_path / "ledger"
    run = run_task("t-pai-flaky-tool", {"ledger": str(ledger)})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["advice"] == FINAL
    # get_weather raised once (the step retried, the run executed again from the top), advise asked the
    # model to try again once (a recorded outcome): lookup_order ran once, and no model request twice.
    assert ledger_lines(ledger) == [
        "lookup_order A-7",
        "get_weather Lisbon",
        "get_weather Lisbon",
        "advise 21C sunny",
        "advise 21C sunny",
    ]
    assert llm.stats()["requests"] == 5
    weather = run.steps.get(key="trip:get_weather")
    assert weather.attempts == 2 and "the weather service is down" in weather.history[0]["error"]["message"]
    advise = run.steps.get(key="trip:advise").output  # the retry prompt the model saw, recorded as such
    assert advise["outcome"] == "retry-part" and "say the weather again, please" in json.dumps(advise["part"])


def test_streamed_text_reaches_the_run_page_and_is_stored(llm, tmp_path, settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread(script={"rules": [{"reply": "Pack light and bring sunglasses."}]})
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        with realtime.capture() as events:
            run = run_task("t-pai-text", {"prompt": "what to pack?"})
    finally:
        server.stop()
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "Pack light and bring sunglasses."
    tokens = [e.data["text"] for e in events if e.kind == "token" and e.data.get("key") == "packer:model"]
    assert len(tokens) > 1 and "".join(tokens) == run.output  # live, piece by piece
    stored = "".join(c.text for c in StepChunk.objects.filter(run=run, step_key="packer:model").order_by("seq"))
    assert stored == run.output


def test_an_async_task_awaits_run(llm, tmp_path):
    run = run_task("t-pai-trip-async", {"ledger": str(tmp_path / "ledger")})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["advice"] == FINAL
    assert [s.key for s in run.steps.order_by("seq")] == TRIP_STEPS


def test_outside_a_task_the_agent_runs_as_it_would_unwrapped(llm, tmp_path):
    result = trip_agent().run_sync("plan my trip for order A-7", deps=str(tmp_path / "ledger"))
    assert result.output.model_dump() == FINAL
    assert llm.stats()["requests"] == 4


def test_a_cassette_of_a_real_run_replays_with_no_call_and_a_changed_prompt_fails_with_the_diff(llm, tmp_path):
    from django.core.management import call_command

    first = run_task("t-pai-trip", {"ledger": str(tmp_path / "ledger")})
    assert first.status == RunStatus.COMPLETED, first.error
    call_command("dex", "cassette", "export", str(first.pk), "-o", str(tmp_path / "trip.json"))
    llm.reset()

    replayed = run_task("t-pai-trip", {"ledger": str(tmp_path / "ledger2")}, cassette=tmp_path / "trip.json")
    assert replayed.status == RunStatus.COMPLETED, replayed.error
    assert replayed.output == first.output
    assert llm.stats()["requests"] == 0
    # The tools still ran: a cassette stands in for the model, not for the agent's own code.
    assert len(ledger_lines(tmp_path / "ledger2")) == 3

    with pytest.raises(CassetteMismatch) as failure:
        changed = {"ledger": str(tmp_path / "l3"), "prompt": "plan my trip for order B-2"}
        run_task("t-pai-trip", changed, cassette=tmp_path / "trip.json")
    assert "LLM request #1 (step 'trip:model')" in str(failure.value)
    assert '-          "content": "plan my trip for order A-7",' in str(failure.value)
    assert '+          "content": "plan my trip for order B-2",' in str(failure.value)
    assert llm.stats()["requests"] == 0


def test_dex_agent_inside_a_step_is_a_clear_error(llm, tmp_path):
    run = run_task("t-pai-in-step", {})
    assert run.status == RunStatus.FAILED
    assert "called inside the step 'nested'" in run.error["message"]


def test_an_mcp_tool_call_is_a_step_that_never_runs_twice(settings, tmp_path):
    from runs.ai.testserver import serve_in_thread

    ledger = tmp_path / "ledger"
    script = {
        "rules": [
            {"contains": "visit to Lisbon recorded", "reply": "Logged."},
            {"tool_calls": [{"name": "record_visit", "arguments": {"ledger": str(ledger), "city": "Lisbon"}}]},
        ]
    }
    server, base_url = serve_in_thread(script=script)
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        run = run_task("t-pai-mcp", {"ledger": str(ledger)})
        assert run.status == RunStatus.COMPLETED, run.error
        assert run.output == {"answer": "Logged."}
        assert [s.key for s in run.steps.order_by("seq")] == [
            "travel:model",
            "travel:record_visit",
            "travel:model#1",
            "after",
        ]
        # The run executed twice ("after" failed once); the MCP tool and the model were asked once each.
        assert ledger_lines(ledger) == ["mcp record_visit Lisbon", "after", "after"]
        assert server.stats()["requests"] == 2
        assert run.steps.get(key="travel:record_visit").output["value"] == "visit to Lisbon recorded"
    finally:
        server.stop()


def test_structured_output_in_the_providers_json_schema_mode(settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        run = run_task("t-pai-native-output", {"prompt": "two days in Porto"})
    finally:
        server.stop()
    assert run.status == RunStatus.COMPLETED, run.error
    # The server built the answer from the JSON schema the agent sent (response_format): valid TripAdvice.
    assert run.output == {
        "city": "Summary: two days in Porto",
        "temperature_c": 5,
        "advice": "Summary: two days in Porto",
    }
    request = run.steps.get(key="planner:model").meta["exchange"]["request"]
    assert request["parameters"]["output_mode"] == "native"
