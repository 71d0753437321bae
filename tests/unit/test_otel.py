"""OpenTelemetry tracing (runs.integrations.otel) in-process: the span tree of a run, the caller's trace
continued from an HTTP `traceparent`, and nothing of OpenTelemetry loaded when the OTEL_* variables are unset.
The same with a real worker exporting to a real OTLP/HTTP receiver: tests/integration/test_tracing.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tests.otel_agents  # noqa: F401  (registers the traced tasks)
from runs import services
from runs.engine import hooks
from runs.integrations.otel import DexTracer
from runs.models import Run, RunStatus
from runs.ops.audit import Actor
from runs.testing import run_task
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans():
    """Dex's tracer registered for one test, exporting to memory (no global provider is set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks.set_tracer(DexTracer(provider.get_tracer("tests")))
    try:
        yield exporter
    finally:
        hooks.set_tracer(None)
        provider.shutdown()


@pytest.fixture
def llm(settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        yield base_url
    finally:
        server.stop()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def test_it_traces_each_execution_and_each_executed_attempt_but_no_replayed_step(spans, llm, tmp_path):
    run = run_task("t-traced", {"ledger": str(tmp_path / "ledger"), "failures": 1, "llm": True})
    assert run.status == RunStatus.COMPLETED, run.error
    named = by_name(spans)
    # One trace: the creation, two executions (the flaky step's retry back-off parked the run between them).
    assert {span.context.trace_id for span in spans.get_finished_spans()} == {
        named["StartRun:t-traced"][0].context.trace_id
    }
    start = named["StartRun:t-traced"][0]
    executions = sorted(named["RunTask:t-traced"], key=lambda s: s.attributes["dex.run.execution"])
    assert [e.attributes["dex.run.execution"] for e in executions] == [1, 2]
    assert all(e.parent.span_id == start.context.span_id for e in executions)
    assert [e.attributes["dex.run.status"] for e in executions] == ["waiting", "completed"]
    assert all(e.attributes["dex.run.id"] == str(run.id) for e in executions)

    # "before" ran once: replaying it in the second execution made no span.
    [before] = named["Step:before"]
    assert before.parent.span_id == executions[0].context.span_id
    # Each attempt of "flaky" is its own span, the failed one an error with the exception recorded.
    failed, succeeded = sorted(named["Step:flaky"], key=lambda s: s.attributes["dex.step.attempt"])
    assert (failed.attributes["dex.step.attempt"], failed.attributes["dex.step.status"]) == (1, "retrying")
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.events[0].name == "exception"
    assert failed.events[0].attributes["exception.message"] == "boom on attempt 1"
    assert failed.parent.span_id == executions[0].context.span_id
    assert (succeeded.attributes["dex.step.attempt"], succeeded.attributes["dex.step.status"]) == (2, "completed")
    assert succeeded.status.status_code == trace.StatusCode.UNSET
    assert succeeded.parent.span_id == executions[1].context.span_id
    assert succeeded.attributes["dex.step.key"] == "flaky"

    # The LLM step, with the GenAI semantic-convention attributes.
    [chat] = named["chat gpt-5-mini"]
    step = run.steps.get(key="ask")
    assert chat.attributes["dex.step.key"] == "ask"
    assert chat.attributes["gen_ai.request.model"] == "gpt-5-mini"
    assert chat.attributes["gen_ai.system"] == step.meta["usage"]["provider"]
    assert chat.attributes["gen_ai.usage.input_tokens"] == step.meta["usage"]["input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] == step.meta["usage"]["output_tokens"] > 0
    assert "dex.llm.cost_usd" in chat.attributes


def test_a_child_run_is_traced_inside_its_parents_trace(spans, tmp_path):
    run = run_task("t-traced", {"ledger": str(tmp_path / "ledger"), "failures": 0, "child": True})
    assert run.status == RunStatus.COMPLETED, run.error
    named = by_name(spans)
    [parent_start] = named["StartRun:t-traced"]
    [child_start] = named["StartRun:t-traced-child"]
    [child_step] = named["Step:child-step"]
    assert child_start.context.trace_id == child_step.context.trace_id == parent_start.context.trace_id
    first_execution = min(named["RunTask:t-traced"], key=lambda s: s.attributes["dex.run.execution"])
    assert child_start.parent.span_id == first_execution.context.span_id


def test_a_run_triggered_from_python_continues_the_current_span(spans):
    provider = TracerProvider()
    with provider.get_tracer("caller").start_as_current_span("caller") as caller:
        run, _ = services.run_trigger(task_id="t-traced-child", payload={"ledger": "/dev/null"}, by=Actor.system("t"))
    [start] = by_name(spans)["StartRun:t-traced-child"]
    assert start.parent.span_id == caller.get_span_context().span_id
    assert start.context.trace_id == caller.get_span_context().trace_id
    assert run.trace_context["traceparent"].split("-")[1] == format(caller.get_span_context().trace_id, "032x")


@pytest.mark.parametrize("handler", ["wsgi", "asgi"])
def test_the_api_trigger_continues_the_callers_traceparent(spans, settings, handler):
    settings.MIDDLEWARE = ["runs.integrations.otel.TraceContextMiddleware", *settings.MIDDLEWARE]
    _key, secret = services.apikey_create(name="otel", by=Actor.system("tests"))
    headers = {"authorization": f"Bearer {secret}", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    body = {"payload": {"ledger": "/dev/null"}}
    if handler == "wsgi":
        response = Client(headers=headers).post("/api/tasks/t-traced-child/trigger", body, "application/json")
    else:  # daphne's path: the middleware's async side
        post = AsyncClient().post
        response = async_to_sync(post)("/api/tasks/t-traced-child/trigger", body, "application/json", headers=headers)
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["id"])
    [start] = by_name(spans)["StartRun:t-traced-child"]
    assert format(start.context.trace_id, "032x") == CALLER_TRACE
    assert format(start.parent.span_id, "016x") == CALLER_SPAN
    assert run.trace_context["traceparent"] == f"00-{CALLER_TRACE}-{format(start.context.span_id, '016x')}-01"


# What Dex's tracing loads. redis-py (8.x) imports OpenTelemetry's API and metrics SDK by itself whenever they are
# installed, tracing on or off, so "nothing of opentelemetry" can only be said of Dex's own path.
TRACING_MODULES = (
    "runs.integrations.otel",
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.propagate",
)


def test_with_the_variables_unset_dex_loads_nothing_of_its_tracing():
    code = (
        "import django, sys; django.setup();"
        "from runs.engine import hooks;"
        f"print([m for m in {TRACING_MODULES!r} if m in sys.modules], type(hooks._tracer).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["DJANGO_SETTINGS_MODULE"] = "dexweb.settings"
    off = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["[]", "NoneType"], off.stderr[-2000:]
    on = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert on.stdout.split()[-1] == "DexTracer", on.stderr[-2000:]
    assert "runs.integrations.otel" in on.stdout


def test_an_attempt_whose_worker_died_shows_as_a_failed_span_before_the_attempt_that_ran_again(spans, tmp_path):
    from runs.engine import enqueue_to, run_create
    from runs.sdk.registry import registry
    from runs.testing import drive

    task = registry.get("t-traced-child")
    with enqueue_to(lambda run_id: None):
        run, _ = run_create(task=task, payload={"ledger": str(tmp_path / "ledger")})
    # What the heartbeat had recorded when the worker executing the step's first attempt died.
    Run.objects.filter(pk=run.pk).update(
        inflight={"key": "child-step", "seq": 0, "attempt": 1, "started_at": "2026-12-05T07:00:00+00:00"}
    )
    assert drive(run).status == RunStatus.COMPLETED
    lost, ran = sorted(by_name(spans)["Step:child-step"], key=lambda s: s.attributes["dex.step.attempt"])
    assert (lost.attributes["dex.step.attempt"], lost.attributes["dex.step.status"]) == (1, "worker_lost")
    assert lost.status.status_code == trace.StatusCode.ERROR
    assert (ran.attributes["dex.step.attempt"], ran.attributes["dex.step.status"]) == (2, "completed")


def test_a_steps_span_is_current_while_its_function_runs_sync_or_async(spans):
    run = run_task("t-traced-current", {})
    [whoami] = by_name(spans)["Step:whoami"]
    assert run.output == format(whoami.context.span_id, "016x")

    run = run_task("t-traced-async", {})
    assert run.status == RunStatus.COMPLETED, run.error
    named = by_name(spans)
    [coroutine], [function] = named["Step:coroutine"], named["Step:function"]
    assert run.output == {
        "coroutine": format(coroutine.context.span_id, "016x"),
        "function": format(function.context.span_id, "016x"),
    }
    [execution] = named["RunTask:t-traced-async"]
    assert coroutine.parent.span_id == function.parent.span_id == execution.context.span_id


class BrokenTracer(hooks.Tracer):
    """Every hook fails."""

    def _fail(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("the tracer is broken")

    run_trace_context = execution_started = execution_ended = step_started = step_running = step_ended = _fail


def test_a_failing_tracer_never_fails_the_run(tmp_path, caplog):
    hooks.set_tracer(BrokenTracer())
    try:
        run = run_task("t-traced", {"ledger": str(tmp_path / "ledger"), "failures": 1})
    finally:
        hooks.set_tracer(None)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["flaky"] == "ok on attempt 2"
    assert "the tracer is broken" in caplog.text


def test_a_run_created_where_tracing_was_off_is_traced_under_its_own_id(spans, tmp_path):
    from runs.engine import enqueue_to, run_create
    from runs.sdk.registry import registry
    from runs.testing import drive

    tracer = hooks._tracer
    hooks.set_tracer(None)  # the web process that triggered it had no OTEL_* variables
    with enqueue_to(lambda run_id: None):
        run, _ = run_create(task=registry.get("t-traced"), payload={"ledger": str(tmp_path / "ledger")})
    hooks.set_tracer(tracer)
    assert run.trace_context is None
    assert drive(run).status == RunStatus.COMPLETED
    executions = by_name(spans)["RunTask:t-traced"]
    assert len(executions) == 2  # the retry back-off parked it between them
    assert {span.context.trace_id for span in spans.get_finished_spans()} == {run.id.int}
