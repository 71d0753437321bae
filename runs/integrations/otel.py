"""OpenTelemetry traces of runs, from the standard OTEL_* variables (DESIGN §8; README: Tracing).

Imported only when tracing is on (settings.DEX_OTEL: an OTLP endpoint or OTEL_TRACES_EXPORTER is set); with it
off nothing of OpenTelemetry is loaded and the engine's trace hooks are one `is None` test each.

The shape follows Temporal's TracingInterceptor (StartWorkflow → RunWorkflow → RunActivity) and DBOS's tracer
(a span per workflow and per step), with the replay rule Temporal's newer plugin and pydantic-ai#6919 ask for:
a step replayed from the record emits no span.

    caller's span (HTTP `traceparent`, or the span current where run_trigger was called from Python)
    └─ StartRun:<task>          where the run was created; its context is stored on the run row
       ├─ RunTask:<task>        one per execution (the first, and each resume after a retry back-off, a
       │  │                      sleep, a wait or a crash), on whatever worker claimed it
       │  ├─ Step:<key>         one per executed attempt (dex.step.attempt); a failed attempt has status ERROR
       │  ├─ chat <model>       an LLM step, with the GenAI semantic-convention attributes
       │  └─ StartRun:<child>   a child run (ctx.invoke / ctx.map): its own executions nest under it
       └─ RunTask:<task>        the next execution: memoised steps are absent, the retried one shows attempt 2

The context travels on the run row, not in the Celery message: Postgres is the record and a message only a
wake-up (the scheduler may resend it, or a different worker may resume the run a day later).
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from runs.engine import hooks
from runs.integrations import missing_extra
from runs.models import Run, RunStatus

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
except ImportError as exc:  # OTEL_* set, but Dex's `otel` extra not installed
    raise missing_extra("otel", "The OpenTelemetry SDK", exc) from exc

log = logging.getLogger(__name__)

INSTRUMENTATION = "dex"
FAILED_RUN = (RunStatus.FAILED, RunStatus.TIMED_OUT)


def install() -> DexTracer:
    """Register Dex's tracer with the engine (RunsConfig.ready, when settings.DEX_OTEL). A TracerProvider the
    application set up itself (Logfire, a collector's distro) is used as it is; otherwise one is built from the
    OTEL_* variables: OTEL_SERVICE_NAME (default "dex"), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER
    ("otlp", the default, over HTTP/protobuf; "console"), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _HEADERS and
    the batch processor's OTEL_BSP_*."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = provider_from_environment()
        trace.set_tracer_provider(provider)
        _flush_when_celery_children_exit(provider)
    tracer = DexTracer(provider.get_tracer(INSTRUMENTATION))
    hooks.set_tracer(tracer)
    return tracer


def provider_from_environment() -> TracerProvider:
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "dex"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        exporter = _exporter(name.strip().lower())
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(name: str) -> SpanExporter | None:
    if name in ("otlp", ""):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol != "http/protobuf":
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: Dex exports traces over http/protobuf only", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout and compression from the OTEL_* variables
    if name == "console":
        return ConsoleSpanExporter()
    if name != "none":
        log.warning("OTEL_TRACES_EXPORTER=%s: unknown exporter (Dex knows otlp and console); ignored", name)
    return None


def _flush_when_celery_children_exit(provider: TracerProvider) -> None:
    """A prefork pool child leaves with os._exit (no atexit): export what its batch still holds first."""
    from celery.signals import worker_process_shutdown

    def flush(**_: Any) -> None:
        provider.force_flush(timeout_millis=5000)

    worker_process_shutdown.connect(flush, weak=False)


# --- the engine's tracer -------------------------------------------------------------------------------------


@dataclass
class _Execution:
    span: trace.Span
    token: object
    # The open span of each step attempt in flight, by id(plan) (a StepPlan is a dataclass: unhashable).
    steps: dict[int, trace.Span] = field(default_factory=dict)


class DexTracer(hooks.Tracer):
    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer
        self._executions: weakref.WeakKeyDictionary[Any, _Execution] = weakref.WeakKeyDictionary()

    # -- a run is created: Temporal's StartWorkflow ------------------------------------------------------------
    def run_trace_context(self, *, task_id: str, parent_id: Any) -> dict | None:
        attributes = {"dex.task.id": task_id}
        if parent_id is not None:
            attributes["dex.run.parent_id"] = str(parent_id)
        # A child of whatever span is current: the HTTP caller's (TraceContextMiddleware), the Python caller's,
        # or a parent run's execution for a child run. With none, it starts the run's own trace.
        with self._tracer.start_as_current_span(f"StartRun:{task_id}", kind=SpanKind.PRODUCER, attributes=attributes):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        return carrier or None

    # -- an execution: Temporal's RunWorkflow ----------------------------------------------------------------
    def execution_started(self, ctx: Any) -> None:
        claim = ctx._claim
        carrier = Run.objects.filter(pk=claim.run_id).values_list("trace_context", flat=True).first()
        parent = propagate.extract(carrier) if carrier else _run_trace(claim.run_id)
        span = self._tracer.start_span(
            f"RunTask:{claim.task_id}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "dex.run.id": str(claim.run_id),
                "dex.task.id": claim.task_id,
                "dex.run.execution": claim.executions,
                "dex.worker": claim.worker,
                "dex.code_version": claim.code_version,
            },
        )
        # Current while the task's code runs: spans its code starts (and child runs it creates) nest here.
        token = otel_context.attach(trace.set_span_in_context(span))
        self._executions[ctx] = _Execution(span, token)

    def execution_ended(self, ctx: Any, status: str | None) -> None:
        execution = self._executions.pop(ctx, None)
        if execution is None:
            return
        for span in execution.steps.values():
            # The execution stopped inside the step (a park, a cancel, a timeout, a lost lease).
            span.set_attribute("dex.step.status", "interrupted")
            span.end()
        span = execution.span
        span.set_attribute("dex.run.status", status or "unsettled")  # the lease was lost, or Postgres failed
        if status in FAILED_RUN:
            span.set_status(Status(StatusCode.ERROR, f"the run {status.replace('_', ' ')}"))
        span.end()
        otel_context.detach(execution.token)

    # -- a step attempt: Temporal's RunActivity ----------------------------------------------------------------
    def step_started(self, ctx: Any, plan: Any) -> None:
        execution = self._executions.get(ctx)
        parent = trace.set_span_in_context(execution.span) if execution else None
        attributes = {
            "dex.run.id": ctx.run_id,
            "dex.task.id": ctx.task_id,
            "dex.step.key": plan.key,
            "dex.step.kind": plan.kind,
            "dex.step.seq": plan.seq,
        }
        for lost in plan.lost:
            # The attempt a dead worker was executing never ended its span there: show it, as the run page does.
            start = _ns(lost.get("started_at"))
            span = self._tracer.start_span(_step_name(plan), context=parent, start_time=start, attributes=attributes)
            span.set_attributes({"dex.step.attempt": lost["attempt"], "dex.step.status": "worker_lost"})
            span.set_status(Status(StatusCode.ERROR, lost["error"]["message"]))
            span.end()
        span = self._tracer.start_span(
            _step_name(plan),
            context=parent,
            start_time=_ns(plan.started),
            attributes={**attributes, "dex.step.attempt": plan.attempt},
        )
        if execution is not None:
            execution.steps[id(plan)] = span
        else:
            span.end()  # a tracer installed mid-execution: nothing to nest under, nothing to keep open

    def step_running(self, ctx: Any, plan: Any) -> AbstractContextManager[Any]:
        execution = self._executions.get(ctx)
        span = execution.steps.get(id(plan)) if execution else None
        if span is None:
            return nullcontext()
        return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def step_ended(
        self, ctx: Any, plan: Any, status: str, *, error: BaseException | None = None, meta: dict | None = None
    ) -> None:
        execution = self._executions.get(ctx)
        span = execution.steps.pop(id(plan), None) if execution else None
        if span is None:
            return
        span.set_attribute("dex.step.status", status)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:500]))
        usage = (meta or {}).get("usage")
        if isinstance(usage, dict):
            request = ((meta or {}).get("exchange") or {}).get("request") or {}
            _genai_attributes(span, usage, request)
        span.end()


def _step_name(plan: Any) -> str:
    return f"Step:{plan.key}"


def _genai_attributes(span: trace.Span, usage: dict, request: dict) -> None:
    """The GenAI semantic conventions (gen_ai.*) on an LLM step's span, and its name "chat <model>"."""
    model = str(request.get("model") or usage.get("model") or "")
    provider = str(usage.get("provider") or "")
    system, _, name = model.partition(":")
    if name and system == provider:
        model = name  # "openai:gpt-5-mini", as Pydantic AI names a model
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider,  # the name before semconv 1.37
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.response.model": str(usage.get("model") or model),
        "gen_ai.usage.input_tokens": int(usage.get("input_tokens") or 0),
        "gen_ai.usage.output_tokens": int(usage.get("output_tokens") or 0),
        "dex.llm.cost_usd": float(usage.get("cost_usd") or 0),
        "dex.llm.cached": bool(usage.get("cached")),
    }
    if usage.get("cassette"):
        attributes["dex.llm.cassette"] = str(usage["cassette"])
    span.set_attributes(attributes)
    if model and span.is_recording():
        span.update_name(f"chat {model}")


def _ns(when: datetime | str | None) -> int | None:
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return None
    return int(when.timestamp() * 1e9) if isinstance(when, datetime) else None


def _run_trace(run_id: UUID) -> Any:
    """The trace of a run created where tracing was off (no stored context): its id is the run's id, so all
    its executions still share one trace, and the trace is found from the run's id."""
    parent = SpanContext(
        trace_id=run_id.int,
        span_id=(run_id.int & 0xFFFF_FFFF_FFFF_FFFF) or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


# --- the HTTP trigger ----------------------------------------------------------------------------------------


class TraceContextMiddleware:
    """Continue the caller's trace: an incoming W3C `traceparent` (and `tracestate`) is the current context
    while Django handles the request, so a run triggered there (StartRun) is a child of the caller's span.
    Left alone when something else (an OpenTelemetry Django instrumentation) already made a span current."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        token = _attach_incoming(request)
        try:
            return self.get_response(request)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        token = _attach_incoming(request)
        try:
            return await self.get_response(request)
        finally:
            if token is not None:
                otel_context.detach(token)


def _attach_incoming(request: HttpRequest) -> object | None:
    if "traceparent" not in request.headers or trace.get_current_span().get_span_context().is_valid:
        return None
    return otel_context.attach(propagate.extract(request.headers))
