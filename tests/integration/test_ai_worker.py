"""LLM steps with a real worker process and the local OpenAI-compatible server."""

from __future__ import annotations

import json
from urllib.request import urlopen

import pytest

from runs import services
from runs.models import Run, RunStatus
from tests.agents import ledger_lines
from tests.conftest import wait_for
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def llm_url():
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    try:
        yield base_url
    finally:
        server.stop()


def requests_made(base_url: str) -> int:
    with urlopen(base_url.removesuffix("/v1") + "/_stats") as response:
        return json.load(response)["requests"]


def test_sigkill_during_the_tool_loop_resumes_without_repeating_finished_tools_or_turns(processes, ledger, llm_url):
    providers = json.dumps({"local": {"kind": "openai", "base_url": llm_url, "models": ["*"]}})
    worker = processes.worker(DEX_LLM_PROVIDERS=providers)
    processes.scheduler()
    run, _ = services.run_trigger(task_id="t-llm-tools-slow", payload={"ledger": str(ledger)})
    wait_for(lambda: "refund start B-1" in ledger_lines(ledger), what="the slow tool to start")
    asked_before_crash = requests_made(llm_url)
    worker.kill()
    processes.worker(name="replacement", DEX_LLM_PROVIDERS=providers)
    finished(run, timeout=60)
    assert run.status == RunStatus.COMPLETED, run.error
    lines = ledger_lines(ledger)
    assert lines.count("check B-1") == 1  # finished before the crash: not run again
    assert lines.count("refund start B-1") == 2  # in flight at the crash: run again, once
    # The first turn was not asked again; only the final turn after the tools was.
    assert requests_made(llm_url) == asked_before_crash + 1
    assert Run.objects.get(pk=run.pk).recoveries == 1
