"""The JSON HTTP API (DESIGN §4), with django-ninja: `Authorization: Bearer <api key>`, OpenAPI at
`/api/openapi.json`, docs at `/api/docs`.

Endpoints only translate: they parse and validate input, call runs.services / runs.selectors, and shape the
output. Every failure leaves as `{"error": {"code", "message", "details?"}}` with its status, through the
exception handlers at the bottom; bad input is never a 500.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn
from uuid import UUID

import pydantic
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from ninja import Field, NinjaAPI, Query, Schema, Status
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as RequestValidationError
from ninja.parser import Parser
from ninja.security import HttpBearer

from runs import selectors, services
from runs.api import keyauth
from runs.engine.create import MAX_DELAY_SECONDS, IdempotencyConflict
from runs.models import ApiKey, ApiKeyScope, Run, RunStatus, StepKind, StepStatus
from runs.ops.audit import Actor
from runs.sdk import Task
from runs.sdk.registry import UnknownTask, registry
from runs.services import RunStateError
from runs.services import WaitpointError as _WaitpointError
from runs.text import find_unstorable

log = logging.getLogger(__name__)

# --- auth and parsing ----------------------------------------------------------------------------------------


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer <api key>`: a live, unexpired key holding the endpoint's `scope`, within its
    rate limit (runs.api.keyauth). `scope=None` demands every scope, so an endpoint that forgets to declare one
    is closed rather than open."""

    def __init__(self, scope: str | None = None):
        super().__init__()
        self.scope = scope

    def __call__(self, request: HttpRequest) -> ApiKey:
        # HttpBearer.__call__ answers every failure with the same bare 401; a client deserves to know
        # whether the header is missing, malformed, names a bad or expired key, or lacks a scope.
        return keyauth.authenticate(request, scope=self.scope)

    def authenticate(self, request: HttpRequest, token: str) -> ApiKey:  # pragma: no cover - __call__ overrides
        return keyauth.authenticate(request, scope=self.scope)


def scoped(scope: ApiKeyScope) -> ApiKeyAuth:
    """The auth of an endpoint that needs `scope`."""
    return ApiKeyAuth(scope.value)


def _refuse_json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class UnsupportedContentType(ValueError):
    pass


def _is_json_content_type(content_type: str) -> bool:
    # request.content_type is the media type without its parameters; "" when the client sent none.
    return content_type in ("", "application/json") or content_type.endswith("+json")


class StrictJSONParser(Parser):
    """JSON as the spec has it: Python's json module also accepts NaN and Infinity, which Postgres's jsonb
    would then refuse when the payload is stored — a 500 for what is really a bad request body. A body sent as
    a form or multipart (curl's `-d` without a Content-Type header, a browser form) is refused by name rather
    than reported as "not valid JSON"."""

    def parse_body(self, request: HttpRequest) -> Any:
        limit = settings.DEX_MAX_PAYLOAD_BYTES
        # runs.api.middleware refuses a Content-Length over the limit; a chunked body has none, so measure it here.
        if len(request.body) > limit:
            raise RequestDataTooBig(f"the request body is {len(request.body):,} bytes; the limit is {limit:,} bytes")
        content_type = (request.content_type or "").lower()
        if request.body and not _is_json_content_type(content_type):
            raise UnsupportedContentType(
                f"the body must be JSON sent with `Content-Type: application/json`, not {content_type[:100]}"
            )
        return json.loads(request.body, parse_constant=_refuse_json_constant)


# --- schemas -------------------------------------------------------------------------------------------------

# Postgres text can't hold NUL characters; refusing them here makes them a 422, not a database error.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL, max_length=200)]
Tag = Annotated[str, Field(min_length=1, max_length=100, pattern=NO_NUL)]
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: Any) -> Any:
    # pydantic alone would also take "1700000000" (a Unix time) or a date without a time or zone; the schema
    # promises an RFC 3339 date-time, and a zone, so "2025-06-01T00:00:00" isn't silently some server's UTC.
    if isinstance(value, str) and not RFC3339.match(value):
        raise ValueError("expected an RFC 3339 date-time with a zone, e.g. 2025-06-01T12:00:00Z")
    return value


def _representable_in_utc(value: datetime) -> datetime:
    # 0001-01-01T00:00:00+05:00 is before the first UTC instant Python (and so Dex) can hold, and
    # 9999-12-31T23:00:00-05:00 after the last: a 422 naming the field, not an overflow deep in a query.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("outside the dates Dex can represent (0001-01-01 to 9999-12-31, in UTC)") from None


DateTime = Annotated[datetime, pydantic.BeforeValidator(_rfc3339), pydantic.AfterValidator(_representable_in_utc)]
# Bounds that keep the values inside what Postgres (an integer column) and timedelta can hold.
INT32 = 2**31 - 1


def _refuse_unstorable_text(**fields: Any) -> None:
    """Postgres text and jsonb refuse NUL characters and lone surrogates. A schema can't say so of free-form
    JSON, so this runs in the endpoint, after its 404s: a 422 naming the field, not a database error."""
    for name, value in fields.items():
        found = find_unstorable(value, [name])
        if found:
            raise RequestValidationError([{"loc": found[0], "msg": found[1], "type": "unstorable_text"}])


class ErrorDetail(Schema):
    loc: list[str | int] = Field(description="Where the problem is, e.g. `['payload', 'count']`.")
    msg: str
    type: str


class ErrorBody(Schema):
    code: str = Field(description="Stable, machine-readable: `unauthorized`, `unknown_task`, `invalid_payload`…")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorOut(Schema):
    error: ErrorBody


class TriggerIn(Schema):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "payload": {"topic": "durable execution", "depth": 2},
                    "idempotency_key": "research-2025-06-01",
                    "tags": ["nightly", "team:search"],
                },
                {"payload": {"name": "Ada"}, "delay": 60, "priority": 5},
            ]
        },
    )

    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="The task's input; its schema is the task's `payload_schema` in `GET /api/tasks`.",
    )
    idempotency_key: str | None = Field(
        None,
        max_length=255,
        pattern=NO_NUL,
        description="Triggering again with this key (within the task's TTL) returns the first run, with 200.",
    )
    tags: list[Tag] = Field(default_factory=list, description="Labels to filter runs by.")
    delay: float | None = Field(
        None, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False, description="Start the run after this many seconds."
    )
    priority: int | None = Field(
        None, ge=-INT32, le=INT32, description="Higher runs first; defaults to the task's priority."
    )


class ReplayIn(Schema):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{}, {"payload": {"topic": "durable execution", "depth": 3}}]},
    )

    payload: dict[str, Any] | None = Field(None, description="An edited payload; the original run's by default.")
    tags: list[Tag] | None = Field(None, description="Tags for the new run; the original run's by default.")


def _query_params_without_null(schema: dict[str, Any]) -> None:
    """A query parameter is absent or a string, never JSON null: describe the optional ones that way, so
    clients (and schema-driven testers) don't try to send `null`."""
    for prop in schema.get("properties", {}).values():
        options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
        if "anyOf" in prop and len(options) == 1:
            del prop["anyOf"]
            prop.update(options[0])


class RunFilters(Schema):
    model_config = pydantic.ConfigDict(json_schema_extra=_query_params_without_null)

    status: list[RunStatus] | None = Field(None, description="One or more statuses (repeat the parameter).")
    task: Text | None = Field(None, description="A task id.")
    tag: Tag | None = Field(None, description="Runs carrying this tag.")
    version: Text | None = Field(None, description="Runs that started on this code version.")
    created_after: DateTime | None = Field(None, description="Runs created after this, e.g. 2025-06-01T00:00:00Z.")
    created_before: DateTime | None = Field(None, description="Runs created before this.")
    # Typed as what it is (the last id of the previous page), so a malformed one is a schema error.
    cursor: UUID | None = Field(None, description="`next_cursor` of the previous page.")
    limit: int = Field(selectors.RUN_LIST_DEFAULT_LIMIT, ge=1, le=selectors.RUN_LIST_MAX_LIMIT)


class RunSummaryOut(Schema):
    id: UUID
    task: str
    status: RunStatus
    error: dict[str, Any] | None = Field(description="`{type, message, step, traceback}` of a failed run.")
    tags: list[str]
    metadata: dict[str, Any]
    parent: UUID | None = Field(description="The run that started this one (`ctx.invoke` / `ctx.map`).")
    replay_of: UUID | None = Field(description="The run this one replays.")
    priority: int
    status_reason: str = Field(
        description='Why a queued or delayed run waits (flow control), e.g. "waiting for a concurrency slot '
        '(2/2 running for user_id=42)"; why a debounced run was canceled. Empty otherwise.'
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cost: float = Field(description="LLM cost so far, in USD.")
    code_version: str = Field(
        description="The code the run started on: DEX_CODE_VERSION, else the deploy's git revision, else a hash "
        "of the task's source (see ctx.patched)."
    )

    @staticmethod
    def resolve_task(run: Run) -> str:
        return run.task_id

    @staticmethod
    def resolve_parent(run: Run) -> UUID | None:
        return run.parent_id

    @staticmethod
    def resolve_replay_of(run: Run) -> UUID | None:
        return run.replay_of_id

    @staticmethod
    def resolve_cost(run: Run) -> float:
        return float(run.cost_usd)


class RunOut(RunSummaryOut):
    payload: dict[str, Any]
    output: Any = Field(description="The task's return value, once completed.")
    execution_versions: list[dict[str, Any]] = Field(
        description="`{execution, version, at}` for the run's first execution and each later one whose code "
        "version differed from the one before."
    )


class StepOut(Schema):
    key: str
    kind: StepKind
    status: StepStatus
    attempts: int
    output: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    usage: dict[str, Any] | None = Field(description="LLM token usage and cost of an `ai` step.")
    failed_attempts: list[dict[str, Any]] = Field(
        description="`{attempt, started_at, finished_at, error: {type, message}}` for each attempt that did not "
        'succeed — an exception, a timeout, or its worker dying under it (type "WorkerLost").'
    )

    @staticmethod
    def resolve_usage(step: Any) -> dict[str, Any] | None:
        return (step.meta or {}).get("usage")

    @staticmethod
    def resolve_failed_attempts(step: Any) -> list[dict[str, Any]]:
        return [
            {**entry, "error": {k: (entry.get("error") or {}).get(k) for k in ("type", "message")}}
            for entry in step.history or []
        ]


class WaitpointOut(Schema):
    token: str
    kind: str
    prompt: str | None
    timeout_at: datetime | None


class RunDetailOut(RunOut):
    steps: list[StepOut]
    waitpoints: list[WaitpointOut] = Field(description="Pending waits: approvals and tokens to complete.")

    @staticmethod
    def resolve_steps(run: Run) -> list[Any]:
        return list(run.steps.all())

    @staticmethod
    def resolve_waitpoints(run: Run) -> list[Any]:
        return [wp for wp in run.waitpoints.all() if wp.completed_at is None]


class EventIn(Schema):
    name: str = Field(min_length=1, max_length=200, examples=["report.reviewed"])
    data: Any = Field(default=None, description="Resumed waits get it as their result; subscribed tasks as payload.")
    id: str | None = Field(
        default=None, max_length=255, description="Your id for the event: an id already received is accepted once."
    )


class EventOut(Schema):
    id: UUID
    name: str
    data: Any
    external_id: str = Field(description="The `id` you sent, if any.")
    received_at: datetime
    duplicate: bool = Field(description="True when this `id` had been received already (nothing was done again).")
    resumed: list[str] = Field(description="Runs whose wait this event completed.")
    started: list[str] = Field(description="Runs started by tasks subscribed to this event.")


class WaitpointCompleteIn(Schema):
    data: Any = Field(
        default=None,
        description="For an approval: {approved: bool, comment?: str, data?: {form fields}}; "
        "for an event or token wait, the value the run resumes with.",
    )


class WaitpointCompletedOut(Schema):
    token: str
    kind: str
    run: UUID
    step: str
    completed_at: datetime
    result: Any

    @staticmethod
    def resolve_run(wp: Any) -> UUID:
        return wp.run_id

    @staticmethod
    def resolve_step(wp: Any) -> str:
        return wp.step_key


class RunPageOut(Schema):
    items: list[RunSummaryOut] = Field(description="Newest first; without `payload` and `output`.")
    next_cursor: UUID | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class RetryOut(Schema):
    attempts: int
    backoff: float
    initial: float
    max_delay: float
    jitter: float


class RateLimitOut(Schema):
    limit: int
    period: float = Field(description="Seconds.")


class TaskOut(Schema):
    id: str
    description: str
    payload_schema: dict[str, Any] | None = Field(description="JSON Schema of the payload `trigger` accepts.")
    is_async: bool
    retry: RetryOut
    max_duration: float | None = Field(
        description="Seconds of execution before the run times out: the task's own, else DEX_DEFAULT_MAX_DURATION."
    )
    timeout: float | None = Field(description="Default per-step timeout, in seconds.")
    concurrency: int | None
    concurrency_key: str | None
    rate_limit: RateLimitOut | None
    rate_key: str | None
    priority: int
    queue: str | None
    idempotency_ttl: float | None = Field(description="Seconds an idempotency key is remembered.")
    events: list[str] = Field(description="Events that start a run of this task.")
    schedule: str | None = Field(description="Cron expression the task runs on.")
    budget_usd: float | None


def _task_out(task: Task) -> dict[str, Any]:
    try:
        schema = task.payload_schema()
    except Exception:
        # A type hint pydantic can't describe shouldn't take the whole task list down with it.
        log.warning("task %s: no JSON schema for its payload", task.id, exc_info=True)
        schema = None
    return {
        "id": task.id,
        "description": task.description,
        "payload_schema": schema,
        "is_async": task.is_async,
        "retry": task.retry,
        "max_duration": task.deadline_seconds,
        "timeout": task.timeout,
        "concurrency": task.concurrency,
        "concurrency_key": task.concurrency_key,
        "rate_limit": {"limit": task.rate_limit[0], "period": task.rate_limit[1]} if task.rate_limit else None,
        "rate_key": task.rate_key,
        "priority": task.priority,
        "queue": task.queue,
        "idempotency_ttl": task.idempotency_ttl,
        "events": task.events,
        "schedule": task.schedule,
        "budget_usd": task.budget_usd,
    }


# --- the API -------------------------------------------------------------------------------------------------

api = NinjaAPI(
    title="Dex API",
    version="1",
    description=(
        "Trigger and inspect durable runs of Dex tasks. Authenticate with `Authorization: Bearer <api key>` "
        "(`manage.py apikey create --name NAME`). Errors are `{error: {code, message, details?}}`."
    ),
    auth=ApiKeyAuth(),
    parser=StrictJSONParser(),
    urls_namespace="api",
)


def _errors(*codes: int) -> dict[int, type[ErrorOut]]:
    """Error statuses an endpoint documents (401, 403 and 429 for all: every endpoint needs a key, with a
    scope, within its rate limit)."""
    return dict.fromkeys((401, 403, 429, *codes), ErrorOut)


def _run_or_404(run_id: str, *, with_steps: bool = False) -> Run:
    parsed = services.run_id_or_none(run_id)
    try:
        if parsed is None:
            raise Run.DoesNotExist
        return selectors.run_get_with_steps(run_id=parsed) if with_steps else selectors.run_get(run_id=parsed)
    except Run.DoesNotExist:
        # A malformed id is as absent as an unknown one: both are 404 (the id is part of the path).
        raise Http404(f"no run with id {run_id[:100]!r}") from None


@contextmanager
def _payload_errors() -> Iterator[None]:
    """The task's payload validation, as a 422 whose `loc`s point into the request body."""
    try:
        yield
    except pydantic.ValidationError as exc:
        raise RequestValidationError(_pydantic_details(exc, prefix=("payload",))) from exc


@api.get(
    "/tasks",
    response={200: list[TaskOut], **_errors()},
    tags=["tasks"],
    summary="List the registered tasks",
    auth=scoped(ApiKeyScope.READ),
)
def tasks_list(request: HttpRequest) -> list[dict[str, Any]]:
    return [_task_out(task) for task in registry.all()]


@api.get(
    "/tasks/{task_id}",
    response={200: TaskOut, **_errors(404)},
    tags=["tasks"],
    summary="One task",
    auth=scoped(ApiKeyScope.READ),
)
def task_detail(request: HttpRequest, task_id: str) -> dict[str, Any]:
    return _task_out(registry.get(task_id))


@api.post(
    "/tasks/{task_id}/trigger",
    response={201: RunOut, 200: RunOut, **_errors(400, 404, 409, 413, 422)},
    tags=["tasks"],
    summary="Start a run",
    description="201 with the new run; 200 with the existing run when `idempotency_key` was used already with "
    "the same payload; 409 `idempotency_conflict` (naming that run in `details`) when it was used with another.",
    auth=scoped(ApiKeyScope.TRIGGER),
)
def task_trigger(request: HttpRequest, task_id: str, body: TriggerIn) -> Status[Run]:
    registry.get(task_id)  # an unknown task is a 404 whatever the body holds
    _refuse_unstorable_text(payload=body.payload, tags=body.tags, idempotency_key=body.idempotency_key)
    with _payload_errors():
        run, created = services.run_trigger(
            task_id=task_id,
            payload=body.payload,
            idempotency_key=body.idempotency_key,
            tags=body.tags,
            delay=body.delay,
            priority=body.priority,
            strict_idempotency=True,
        )
    return Status(201 if created else 200, run)


@api.get(
    "/runs",
    response={200: RunPageOut, **_errors(422)},
    tags=["runs"],
    summary="List runs, newest first",
    auth=scoped(ApiKeyScope.READ),
)
def runs_list(request: HttpRequest, filters: Query[RunFilters]) -> selectors.RunPage:
    unknown = sorted(set(request.GET) - set(RunFilters.model_fields))
    if unknown:
        # A misspelt filter (`?stauts=failed`) would otherwise answer with every run, looking like success.
        raise RequestValidationError(
            [{"loc": ["query", name], "msg": "unknown parameter", "type": "extra_forbidden"} for name in unknown]
        )
    return selectors.run_list(
        statuses=filters.status or (),
        task_id=filters.task,
        tag=filters.tag,
        version=filters.version,
        created_after=filters.created_after,
        created_before=filters.created_before,
        cursor=str(filters.cursor) if filters.cursor else None,
        limit=filters.limit,
    )


@api.get(
    "/runs/{run_id}",
    response={200: RunDetailOut, **_errors(404)},
    tags=["runs"],
    summary="One run",
    auth=scoped(ApiKeyScope.READ),
)
def run_detail(request: HttpRequest, run_id: str) -> Run:
    return _run_or_404(run_id, with_steps=True)


@api.post(
    "/runs/{run_id}/cancel",
    response={200: RunOut, **_errors(404, 409)},
    tags=["runs"],
    summary="Cancel",
    auth=scoped(ApiKeyScope.OPERATE),
)
def run_cancel(request: HttpRequest, run_id: str) -> Run:
    return services.run_cancel(run=_run_or_404(run_id), by=Actor.api(request.auth))


@api.post(
    "/runs/{run_id}/retry",
    response={200: RunOut, **_errors(404, 409)},
    tags=["runs"],
    summary="Retry from the failed step",
    auth=scoped(ApiKeyScope.OPERATE),
)
def run_retry(request: HttpRequest, run_id: str) -> Run:
    return services.run_retry(run=_run_or_404(run_id), by=Actor.api(request.auth))


@api.post(
    "/runs/{run_id}/replay",
    response={201: RunOut, **_errors(400, 404, 413, 422)},
    tags=["runs"],
    summary="Start a new run of the same task",
    description="The same payload and tags unless the body gives new ones; the new run links to this one.",
    auth=scoped(ApiKeyScope.OPERATE),
)
def run_replay(request: HttpRequest, run_id: str, body: ReplayIn | None = None) -> Status[Run]:
    run = _run_or_404(run_id)
    body = body or ReplayIn()
    _refuse_unstorable_text(payload=body.payload, tags=body.tags)
    with _payload_errors():
        new = services.run_replay(run=run, payload=body.payload, tags=body.tags, by=Actor.api(request.auth))
    return Status(201, new)


@api.post(
    "/events",
    response={201: EventOut, 200: EventOut, **_errors(400, 413, 422)},
    tags=["events"],
    summary="Send an event",
    description="Resumes the waits it matches and starts the tasks subscribed to its name. 201 for a new "
    "event; 200 with the first one when its `id` was received already.",
    auth=scoped(ApiKeyScope.EVENTS),
)
def event_send(request: HttpRequest, body: EventIn) -> Status[dict[str, Any]]:
    _refuse_unstorable_text(name=body.name, data=body.data, id=body.id)
    event, created = services.event_send(name=body.name, data=body.data, external_id=body.id or "")
    return Status(
        201 if created else 200,
        {
            "id": event.id,
            "name": event.name,
            "data": event.data,
            "external_id": event.external_id,
            "received_at": event.received_at,
            "duplicate": not created,
            "resumed": event.outcome.get("resumed", []),
            "started": event.outcome.get("started", []),
        },
    )


@api.post(
    "/waitpoints/{token}/complete",
    response={200: WaitpointCompletedOut, **_errors(400, 404, 409, 422)},
    tags=["waitpoints"],
    summary="Complete a wait (approve / reject an approval)",
    auth=scoped(ApiKeyScope.EVENTS),
)
def waitpoint_complete(request: HttpRequest, token: str, body: WaitpointCompleteIn) -> Any:
    _refuse_unstorable_text(data=body.data)
    return services.waitpoint_complete(token=token, data=body.data, by=Actor.api(request.auth))


# --- errors --------------------------------------------------------------------------------------------------

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "throttled",
}


def error_response(
    status: int, code: str, message: str, *, details: list[dict[str, Any]] | None = None
) -> JsonResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JsonResponse({"error": body}, status=status, encoder=DjangoJSONEncoder)


def _pydantic_details(exc: pydantic.ValidationError, *, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    # Only loc, msg and type: `input` would echo the (possibly large or secret) value, `ctx` may hold
    # exceptions that don't serialise.
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _request_loc(loc: list[Any] | tuple[Any, ...]) -> list[Any]:
    """ninja's locs read ["body", "body", "payload", "count"] (source, parameter, field...); a client wants
    the place in what it sent: ["payload", "count"] in the body, ["query", "limit"] elsewhere."""
    loc = list(loc)
    if loc[:1] == ["body"]:
        loc = loc[1:]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        # An error about the body as a whole (missing, not an object).
        return loc or ["body"]
    return loc


@api.exception_handler(RequestValidationError)
def _on_request_invalid(request: HttpRequest, exc: RequestValidationError) -> HttpResponse:
    details = [
        {"loc": _request_loc(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors
    ]
    payload_only = all(d["loc"][:1] == ["payload"] for d in details)
    code = "invalid_payload" if details and payload_only else "validation_error"
    return error_response(422, code, "the request is not valid; see details", details=details)


@api.exception_handler(pydantic.ValidationError)
def _on_pydantic_invalid(request: HttpRequest, exc: pydantic.ValidationError) -> HttpResponse:
    # Payload errors arrive as RequestValidationError (see _payload_errors); one that gets here came from
    # somewhere less expected, so it is logged in case it is ours rather than the client's.
    log.warning("validation error outside a payload: %s", exc)
    return error_response(
        422, "validation_error", "the request is not valid; see details", details=_pydantic_details(exc)
    )


@api.exception_handler(AuthenticationError)
def _on_unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = error_response(401, "unauthorized", exc.message)
    response["WWW-Authenticate"] = 'Bearer realm="dex"'
    return response


@api.exception_handler(keyauth.ApiAuthError)
def _on_auth_error(request: HttpRequest, exc: keyauth.ApiAuthError) -> HttpResponse:
    response = error_response(exc.status, exc.code, exc.message)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="dex"'
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(HttpError)
def _on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja turns whatever the parser raised into "400 Cannot parse request body"; the cause says more.
    if isinstance(exc.__cause__, RequestDataTooBig):
        return _on_too_big(request, exc.__cause__)
    if isinstance(exc.__cause__, UnsupportedContentType):
        return error_response(400, "unsupported_content_type", str(exc.__cause__))
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
        return error_response(400, "invalid_json", f"the request body is not valid JSON: {exc.__cause__}")
    return error_response(exc.status_code, CODES.get(exc.status_code, "error"), exc.message)


@api.exception_handler(RequestDataTooBig)
def _on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(413, "payload_too_large", str(exc) or "the request body is too large")


@api.exception_handler(Http404)
def _on_404(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(404, "not_found", str(exc) or "not found")


@api.exception_handler(ObjectDoesNotExist)
def _on_does_not_exist(request: HttpRequest, exc: ObjectDoesNotExist) -> HttpResponse:
    return error_response(404, "not_found", str(exc) or "not found")


@api.exception_handler(UnknownTask)
def _on_unknown_task(request: HttpRequest, exc: UnknownTask) -> HttpResponse:
    return error_response(404, "unknown_task", str(exc))


@api.exception_handler(IdempotencyConflict)
def _on_idempotency_conflict(request: HttpRequest, exc: IdempotencyConflict) -> HttpResponse:
    details = [{"loc": ["idempotency_key"], "msg": f"already used by run {exc.run.pk}", "type": "conflict"}]
    response = error_response(409, "idempotency_conflict", str(exc), details=details)
    # The first run, for a client that wants to go and look at it.
    response["Location"] = f"/api/runs/{exc.run.pk}"
    return response


@api.exception_handler(RunStateError)
def _on_wrong_state(request: HttpRequest, exc: RunStateError) -> HttpResponse:
    return error_response(409, "run_state", str(exc))


@api.exception_handler(_WaitpointError)
def _on_waitpoint_error(request: HttpRequest, exc: _WaitpointError) -> HttpResponse:
    codes = {404: "not_found", 409: "already_completed", 422: "validation_error"}
    return error_response(exc.status, codes.get(exc.status, "error"), str(exc), details=exc.details)


@api.exception_handler(Exception)
def _on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("API error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")
