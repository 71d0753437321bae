"""Agents written with Pydantic AI and the OpenAI Agents SDK on a real worker: SIGKILL mid-conversation, fork
from a model call, and a cassette of the real run replayed in-process. Model calls are counted at the local
LLM server, tool calls in a ledger file outside Dex."""

from __future__ import annotations

import json

import pytest

import tests.framework_agents  # noqa: F401  (registers the framework tasks in the test process)
import tests.openai_agent_tasks  # noqa: F401
from runs import services
from runs.ai.testserver import serve_in_thread
from runs.models import Run, RunStatus
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import wait_for
from tests.framework_agents import FINAL, trip_script
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

AGENT_MODULES = "tests.agents,tests.framework_agents"
OA_MODULES = "tests.agents,tests.openai_agent_tasks"
TOOLS_ONCE = ["lookup_order A-7", "get_weather Lisbon", "advise 21C sunny"]


@pytest.fixture
def llm():
    """Start the local LLM server with a script; yields (server, DEX_LLM_PROVIDERS routing every model to it)."""
    servers = []

    def start(script: dict) -> tuple:
        server, base_url = serve_in_thread(script=script)
        servers.append(server)
        return server, json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def trip_llm(llm):
    """The four-call trip conversation; its third model call hangs (once) so the worker can be killed
    while it is in flight: the first two calls and both their tools are done by then."""
    return llm(trip_script(third_call_delay=20))


def model_calls(server) -> int:
    return server.stats()["requests"]


def test_pydantic_ai_resumes_after_sigkill_without_repeating_a_model_or_tool_call(processes, ledger, trip_llm):
    server, providers = trip_llm
    worker = processes.worker(DEX_LLM_PROVIDERS=providers, DEX_AGENT_MODULES=AGENT_MODULES)
    processes.scheduler()
    run, _ = services.run_trigger(task_id="t-pai-trip", payload={"ledger": str(ledger)})
    wait_for(lambda: model_calls(server) == 3, timeout=60, what="the third model call to be in flight")
    assert ledger_lines(ledger) == TOOLS_ONCE[:2]
    worker.kill()

    processes.worker(name="replacement", DEX_LLM_PROVIDERS=providers, DEX_AGENT_MODULES=AGENT_MODULES)
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED, run.error
    assert model_calls(server) == 3 + 2  # the unanswered third call again, and the fourth
    assert ledger_lines(ledger) == TOOLS_ONCE  # each tool exactly once
    assert run.output["advice"] == FINAL  # the structured output
    # And the whole history: the prompt, 4 responses, 3 tool returns and the output tool's return.
    assert run.output["messages"] == 9
    assert Run.objects.get(pk=run.pk).recoveries == 1

    # Fork from the third model call, with the weather the step before it returned edited: only the third
    # and fourth calls are asked again, and only the tool after the third runs again.
    edited = {"outcome": "return", "value": "Lisbon: 21C sunny, light wind"}
    fork = services.run_fork(run=run, step_key="trip:model#2", output=edited, by=Actor.system("tests"))
    finished(fork, timeout=60)
    assert fork.status == RunStatus.COMPLETED, fork.error
    assert model_calls(server) == 5 + 2
    assert ledger_lines(ledger) == [*TOOLS_ONCE, "advise 21C sunny"]
    third = fork.steps.get(key="trip:model#2").meta["exchange"]["request"]
    assert "light wind" in json.dumps(third["messages"])


def test_a_cassette_exported_from_a_real_run_replays_in_run_task_with_no_provider_call(
    processes, ledger, llm, tmp_path, settings
):
    from django.core.management import call_command

    from runs.ai.cassettes import CassetteMismatch
    from runs.testing import run_task

    server, providers = llm(trip_script())
    processes.worker(DEX_LLM_PROVIDERS=providers, DEX_AGENT_MODULES=AGENT_MODULES)
    run, _ = services.run_trigger(task_id="t-pai-trip", payload={"ledger": str(ledger)})
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED, run.error
    cassette = tmp_path / "trip.json"
    call_command("dex", "cassette", "export", str(run.pk), "-o", str(cassette))

    # No provider at all now: every model is routed to a port nothing listens on.
    server.stop()
    before = model_calls(server)
    settings.DEX_LLM_PROVIDERS = json.dumps(
        {"nowhere": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "models": ["*"]}}
    )
    replayed = run_task("t-pai-trip", {"ledger": str(tmp_path / "replay-ledger")}, cassette=cassette)
    assert replayed.status == RunStatus.COMPLETED, replayed.error
    assert replayed.output == run.output
    assert model_calls(server) == before

    with pytest.raises(CassetteMismatch, match=r"(?s)LLM request #1 .*-.*order A-7.*\+.*order B-2"):
        run_task("t-pai-trip", {"ledger": str(ledger), "prompt": "plan my trip for order B-2"}, cassette=cassette)


def test_openai_agents_resume_after_sigkill_without_repeating_a_model_or_tool_call(processes, ledger, llm):
    # The server acts as the agent (each tool once, then the answer); the third model call hangs, once.
    server, providers = llm({"rules": [{"calls": 3, "delay": 20}]})
    env = {"DEX_LLM_PROVIDERS": providers, "DEX_AGENT_MODULES": OA_MODULES, "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    worker = processes.worker(**env)
    processes.scheduler()
    run, _ = services.run_trigger(task_id="t-oa-trip", payload={"ledger": str(ledger)})
    wait_for(lambda: model_calls(server) == 3, timeout=60, what="the third model call to be in flight")
    assert ledger_lines(ledger) == ["lookup_order", "get_weather"]
    worker.kill()

    processes.worker(name="replacement", **env)
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED, run.error
    assert model_calls(server) == 3 + 2
    assert ledger_lines(ledger) == ["lookup_order", "get_weather", "advise"]
    assert run.output["output"] == "Tool advise returned: pack sunglasses"
    assert Run.objects.get(pk=run.pk).recoveries == 1

    edited = "Lisbon: 21C sunny, light wind"
    fork = services.run_fork(run=run, step_key="trip:model#2", output=edited, by=Actor.system("tests"))
    finished(fork, timeout=60)
    assert fork.status == RunStatus.COMPLETED, fork.error
    assert model_calls(server) == 5 + 2
    assert ledger_lines(ledger) == ["lookup_order", "get_weather", "advise", "advise"]
    assert "light wind" in json.dumps(fork.steps.get(key="trip:model#2").meta["exchange"]["request"]["input"])
