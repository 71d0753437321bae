"""OpenTelemetry end to end: a run triggered through the API with a `traceparent`, executed by a real worker
process whose OTEL_* variables point at a real OTLP/HTTP receiver on loopback (this module's, decoding the
protobuf export requests with opentelemetry-proto). One worker and one scheduler serve the whole module."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import tests.otel_agents  # noqa: F401  (registers the traced tasks in this process)
from runs import services
from runs.engine import hooks
from runs.integrations.otel import DexTracer
from runs.models import Run, RunStatus
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import Processes, wait_for
from tests.integration.test_worker import finished

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


class OtlpReceiver(ThreadingHTTPServer):
    """POST /v1/traces as an OpenTelemetry collector takes it (OTLP/HTTP, protobuf); keeps every span."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]


class _ExportHandler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_error(404)
            return
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.server.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "attributes": _attributes(span.attributes),
                                "status": span.status.code,
                                "events": [event.name for event in span.events],
                                "service": resource.get("service.name"),
                            }
                        )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value") or "string_value") for pair in pairs}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    try:
        yield base_url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def traced_worker(
    dex_env: dict[str, str], receiver: OtlpReceiver, llm_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    """A worker exporting its spans to the receiver, and a scheduler (it wakes a step's retry back-off)."""
    procs = Processes(dex_env, tmp_path_factory.mktemp("tracing"))
    try:
        procs.worker(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_SERVICE_NAME="dex-worker",
            OTEL_BSP_SCHEDULE_DELAY="50",
            DEX_AGENT_MODULES=f"{dex_env['DEX_AGENT_MODULES']},tests.otel_agents",
            DEX_LLM_PROVIDERS=json.dumps({"local": {"kind": "openai", "base_url": llm_url, "models": ["*"]}}),
        )
        procs.scheduler()
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def traced_web(receiver: OtlpReceiver, settings: Any) -> Iterator[None]:
    """This process as the web process with tracing on: the middleware and Dex's tracer, exporting to the
    receiver (no global provider is set, so the rest of the session stays untraced)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "dex-web"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces")))
    hooks.set_tracer(DexTracer(provider.get_tracer("dex")))
    settings.MIDDLEWARE = ["runs.integrations.otel.TraceContextMiddleware", *settings.MIDDLEWARE]
    try:
        yield
    finally:
        hooks.set_tracer(None)
        provider.shutdown()


def named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


def test_one_trace_from_the_api_trigger_to_the_last_step(traced_worker, traced_web, receiver, tmp_path: Path):
    ledger = tmp_path / "ledger"
    _key, secret = services.apikey_create(name="otel", by=Actor.system("tests"))
    client = Client(headers={"authorization": f"Bearer {secret}", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    response = client.post(
        "/api/tasks/t-traced/trigger",
        {"payload": {"ledger": str(ledger), "failures": 1, "llm": True, "child": True}},
        "application/json",
    )
    assert response.status_code == 201, response.content
    run = finished(Run.objects.get(pk=response.json()["id"]), timeout=60)
    assert run.status == RunStatus.COMPLETED, run.error
    assert ledger_lines(ledger) == ["before", "flaky attempt 1", "flaky attempt 2", "child-step", "after"]

    def last_execution_exported() -> list[dict[str, Any]]:
        spans = receiver.of_trace(CALLER_TRACE)
        done = [s for s in named(spans, "RunTask:t-traced") if s["attributes"]["dex.run.status"] == "completed"]
        return spans if done else []

    spans = wait_for(last_execution_exported, what="the run's last execution to be exported")

    # The trigger, in the web process: a child of the caller's span.
    [start] = named(spans, "StartRun:t-traced")
    assert (start["parent"], start["service"]) == (CALLER_SPAN, "dex-web")
    # Three executions on the worker (parked by the retry back-off, then by the child run), each under it.
    executions = sorted(named(spans, "RunTask:t-traced"), key=lambda s: s["attributes"]["dex.run.execution"])
    assert [e["attributes"]["dex.run.status"] for e in executions] == ["waiting", "waiting", "completed"]
    assert {e["parent"] for e in executions} == {start["span_id"]}
    assert {e["service"] for e in executions} == {"dex-worker"}
    assert {e["attributes"]["dex.run.id"] for e in executions} == {str(run.id)}
    in_execution = {e["span_id"]: e["attributes"]["dex.run.execution"] for e in executions}

    def attempts(key: str) -> list[tuple[int, int, str, int]]:
        """(execution, attempt, status, OTLP status code) of each span of the step `key`."""
        return sorted(
            (
                in_execution[s["parent"]],
                s["attributes"]["dex.step.attempt"],
                s["attributes"]["dex.step.status"],
                s["status"],
            )
            for s in spans
            if s["attributes"].get("dex.step.key") == key
        )

    # Memoised steps replayed by executions 2 and 3 have no span; the retried step one span per attempt.
    assert attempts("before") == [(1, 1, "completed", 0)]
    assert attempts("flaky") == [(1, 1, "retrying", STATUS_ERROR), (2, 2, "completed", 0)]
    assert attempts("ask") == [(2, 1, "completed", 0)]
    assert attempts("after") == [(3, 1, "completed", 0)]
    [failed] = [s for s in named(spans, "Step:flaky") if s["status"] == STATUS_ERROR]
    assert failed["events"] == ["exception"]

    # The LLM step, with the GenAI semantic-convention attributes.
    [chat] = named(spans, "chat gpt-5-mini")
    usage = run.steps.get(key="ask").meta["usage"]
    assert chat["attributes"]["gen_ai.request.model"] == "gpt-5-mini"
    assert chat["attributes"]["gen_ai.system"] == usage["provider"]
    assert chat["attributes"]["gen_ai.usage.input_tokens"] == usage["input_tokens"] > 0
    assert chat["attributes"]["gen_ai.usage.output_tokens"] == usage["output_tokens"] > 0

    # The child run: created inside the parent's second execution, its own execution and step in the same trace.
    [child_start] = named(spans, "StartRun:t-traced-child")
    assert in_execution[child_start["parent"]] == 2
    [child_execution] = named(spans, "RunTask:t-traced-child")
    assert child_execution["parent"] == child_start["span_id"]
    [child_step] = named(spans, "Step:child-step")
    assert child_step["parent"] == child_execution["span_id"]
