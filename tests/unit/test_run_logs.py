"""A run's logs hold what its code logged, not the HTTP chatter of the LLM clients it used (the LLM step already
records each call): httpx/openai lines below WARNING stay out, their warnings stay in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from runs.models import LogLine, RunStatus
from runs.sdk import task
from runs.sdk.registry import registry
from runs.testing import run_task

pytestmark = pytest.mark.django_db


def _chatty(ctx: Any) -> str:
    def call() -> str:
        logging.getLogger("httpx").info('HTTP Request: POST http://llm/v1/chat/completions "HTTP/1.1 200 OK"')
        logging.getLogger("openai._base_client").info("Retrying request to /chat/completions")
        logging.getLogger("httpx2").info('HTTP Request: POST http://llm/v1/chat/completions "HTTP/1.0 200 OK"')
        logging.getLogger("httpx").warning("the connection pool is full")
        ctx.log.info("asked the model")
        return "ok"

    return ctx.step("ask", call)


@pytest.fixture
def chatty() -> Iterator[Any]:
    t = task("t-chatty")(_chatty)
    yield t
    registry.unregister(t.id)


def test_it_keeps_llm_http_info_lines_out_of_the_runs_logs(chatty: Any) -> None:
    run = run_task(chatty, {})
    assert run.status == RunStatus.COMPLETED
    messages = list(LogLine.objects.filter(run=run).values_list("level", "message"))
    assert ("INFO", "asked the model") in messages
    assert ("WARNING", "the connection pool is full") in messages
    assert not [m for _, m in messages if "HTTP Request" in m or "Retrying request" in m], messages
