"""Text Postgres can't store (NUL, lone surrogates) is never a database error (issue 12). Reaching the
dashboard inside JSON — `"\\u0000"` and `"\\ud800"` escapes parse fine — it is a form error or a refusal that
says why (found by tests/unit/test_form_fuzz.py); returned by a step it fails the step; quoted by an exception
or a log line (text Dex writes itself) it is stored made visible, never crashing the worker that records it."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.utils import timezone

from runs.models import Event, LogLine, Run, RunStatus, Step, StepStatus
from runs.sdk import Retry, task
from runs.testing import run_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def failed_run() -> Run:
    now = timezone.now()
    run = Run.objects.create(task_id="t-typed", status=RunStatus.FAILED, payload={"name": "a"}, finished_at=now)
    Step.objects.create(run=run, key="first", seq=0, status=StepStatus.COMPLETED, output=1, started_at=now)
    Step.objects.create(run=run, key="second", seq=1, status=StepStatus.FAILED, started_at=now)
    return run


@pytest.mark.parametrize(
    "payload, message",
    [('{"name": "x\\u0000"}', "text can't contain NUL"), ('{"name": "x\\ud800"}', "no lone surrogates")],
)
def test_a_replay_whose_payload_postgres_cannot_store_is_refused(
    operator: Client, failed_run: Run, payload: str, message: str
) -> None:
    response = operator.post(f"/runs/{failed_run.pk}/replay/", {"payload": payload})
    assert response.status_code == 302
    assert any(message in str(m) for m in get_messages(response.wsgi_request))
    assert Run.objects.count() == 1


@pytest.mark.parametrize("data", ['{"a": "\\u0000"}', '"\\ud800"', '{"\\u0000": 1}'])
def test_an_event_whose_data_postgres_cannot_store_is_a_form_error(operator: Client, data: str) -> None:
    response = operator.post("/events/", {"name": "order.paid", "data": data})
    assert response.status_code == 422
    page = response.content.decode()
    assert "text can&#x27;t contain NUL" in page or "no lone surrogates" in page
    assert not Event.objects.exists()


def test_a_trigger_form_refuses_a_nul_in_its_options(operator: Client) -> None:
    response: Any = operator.post("/tasks/t-typed/", {"payload-name": "ok", "run-idempotency_key": "k\x00"})
    assert response.status_code == 422
    assert not Run.objects.exists()


@pytest.mark.parametrize("output", ['"x\\u0000"', '{"name": "x\\ud800"}'])
def test_a_fork_whose_edited_output_postgres_cannot_store_is_refused(
    operator: Client, failed_run: Run, output: str
) -> None:
    second = failed_run.steps.get(key="second")
    response = operator.post(f"/runs/{failed_run.pk}/steps/{second.pk}/fork/", {"output": output})
    assert response.status_code == 302
    assert any("Postgres can't store" in str(m) for m in get_messages(response.wsgi_request))
    assert Run.objects.count() == 1


def _surrogate() -> str:
    return "\ud800"


@task("t-returns-a-surrogate", retry=Retry(attempts=1))
def returns_a_surrogate(ctx) -> str:
    return ctx.step("odd", _surrogate)


def test_a_step_returning_a_lone_surrogate_fails_clearly_instead_of_crashing_the_worker() -> None:
    run = run_task("t-returns-a-surrogate", {})
    assert run.status == RunStatus.FAILED
    assert "isn't valid Unicode (a lone surrogate)" in run.error["message"]


def _raise(text: str) -> None:
    raise ValueError(text)


@task("t-odd-errors", retry=Retry(attempts=1))
def odd_errors(ctx, text: str = "", log: bool = False) -> str:
    if log:
        ctx.log.info("log line with \ud800 and \x00")
        return "ok"
    return ctx.step("odd", _raise, {"nul": "a\x00b", "surrogate": "c\ud800d"}[text])


@pytest.mark.parametrize("text, shown", [("nul", "a\\x00b"), ("surrogate", "c\ufffdd")])
def test_an_error_quoting_unstorable_text_is_recorded_with_it_made_visible(text: str, shown: str) -> None:
    run = run_task("t-odd-errors", {"text": text})
    assert run.status == RunStatus.FAILED
    assert run.error["message"] == shown


def test_a_log_line_with_unstorable_text_is_kept() -> None:
    run = run_task("t-odd-errors", {"log": True})
    assert run.status == RunStatus.COMPLETED
    assert LogLine.objects.get(run=run).message == "log line with \ufffd and \\x00"


def _bad_metadata(ctx: Any) -> None:
    ctx.set_metadata("progress", {"note": "x\x00"})


@task("t-odd-metadata", retry=Retry(attempts=1))
def odd_metadata(ctx) -> str:
    _bad_metadata(ctx)
    return "unreachable"


def test_metadata_postgres_cannot_store_fails_in_the_caller_s_code() -> None:
    run = run_task("t-odd-metadata", {})
    assert run.status == RunStatus.FAILED
    assert run.error["message"] == "ctx.set_metadata: progress.note: text can't contain NUL (\\u0000) characters"
