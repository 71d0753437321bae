"""Dex's public SDK: `@task`, `Retry` and the errors an agent author raises or catches.

    from runs.sdk import task, Retry, NonRetriableError

    @task("research-agent", retry=Retry(attempts=4))
    def research_agent(ctx, topic: str, depth: int = 3) -> dict:
        queries = ctx.step("plan", plan_queries, topic, depth)
        ...

The context `ctx` a task receives is `runs.engine.RunContext` (or `AsyncRunContext` for `async def` tasks).
"""

from __future__ import annotations

import inspect
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

import pydantic
from pydantic_core import PydanticCustomError

from runs.sdk.registry import registry
from runs.text import find_unstorable

__all__ = [
    "Cancelled",
    "ChildRunFailed",
    "NonDeterminismError",
    "NonRetriableError",
    "Retry",
    "StepTimeout",
    "Task",
    "task",
]


class NonRetriableError(Exception):
    """Raise from a step to fail it at once, without the remaining retries."""


class NonDeterminismError(Exception):
    """The task asked for its steps in a different order than the run recorded."""


class StepTimeout(Exception):
    """A step ran past its `timeout`. The attempt fails and is retried per policy."""


class ChildRunFailed(Exception):
    """`ctx.invoke` of a child run that failed; carries the child's error."""

    def __init__(self, message: str, *, run_id: str = "", error: dict | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.error = error or {}


class Cancelled(BaseException):
    """The run was cancelled (or lost its lease): no further step may start.

    A BaseException, like asyncio.CancelledError, so an agent's `except Exception:` can't swallow it.
    """


@dataclass(frozen=True)
class Retry:
    """Retry policy: `attempts` in all (1 = no retry), the n-th retry after
    `min(initial * backoff**(n-1), max_delay)` seconds, spread by ±`jitter` so retries don't stampede."""

    attempts: int = 3
    backoff: float = 2.0
    initial: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")
        if self.initial < 0 or self.max_delay < 0 or self.backoff < 1:
            raise ValueError("Retry needs initial ≥ 0, max_delay ≥ 0 and backoff ≥ 1")

    def delay_after(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number `failed_attempt` (1-based) failed."""
        base = min(self.initial * self.backoff ** (failed_attempt - 1), self.max_delay)
        return max(0.0, base * random.uniform(1 - self.jitter, 1 + self.jitter))


DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)


def _seconds(value: timedelta | float | int | None, name: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ValueError(f"{name} must be positive")
    return seconds


@dataclass
class Task:
    """A registered task: the function and its options."""

    id: str
    fn: Callable[..., Any]
    retry: Retry = DEFAULT_RETRY
    max_duration: float | None = None
    timeout: float | None = None
    concurrency: int | None = None
    concurrency_key: str | None = None
    rate_limit: tuple[int, float] | None = None
    rate_key: str | None = None
    debounce: float | None = None
    debounce_key: str | None = None
    priority: int = 0
    queue: str | None = None
    idempotency_ttl: float | None = None
    events: list[str] = field(default_factory=list)
    schedule: str | None = None
    budget_usd: float | None = None
    # Extra alert destinations for this task's runs: webhook URLs and email addresses (runs/ops/alerts.py).
    alerts: list[str] = field(default_factory=list)
    description: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def deadline_seconds(self) -> float | None:
        """Execution time a run of this task may use: its `max_duration`, else DEX_DEFAULT_MAX_DURATION (DESIGN
        §3: so no run holds a worker forever by mistake); None when both leave it unbounded."""
        if self.max_duration is not None:
            return self.max_duration
        from django.conf import settings  # read per run: tests and deployments change it without re-registering

        default = getattr(settings, "DEX_DEFAULT_MAX_DURATION", 0) or 0
        return float(default) if default > 0 else None

    @property
    def qualified_name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @cached_property
    def _parameters(self) -> list[inspect.Parameter]:
        params = list(inspect.signature(self.fn).parameters.values())
        if not params:
            raise TypeError(f"task {self.id!r}: the function must take the run context as first argument")
        return params[1:]

    @cached_property
    def _hints(self) -> dict[str, Any]:
        # include_extras keeps `Annotated[int, Field(ge=1, le=100)]`: a task's input bounds, which the API and
        # the dashboard then enforce before a run exists.
        return typing.get_type_hints(self.fn, include_extras=True)

    @cached_property
    def model_param(self) -> str | None:
        """The parameter's name when the task takes one pydantic model as its whole payload."""
        params = self._parameters
        if len(params) == 1:
            hint = self._hints.get(params[0].name)
            if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
                return params[0].name
        return None

    @cached_property
    def payload_model(self) -> type[pydantic.BaseModel]:
        """A pydantic model of the payload, from the function's type hints."""
        if self.model_param:
            return self._hints[self.model_param]
        fields: dict[str, Any] = {}
        for p in self._parameters:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            hint = self._hints.get(p.name, Any)
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (hint, default)
        name = "".join(part.capitalize() for part in self.id.replace("_", "-").split("-")) + "Payload"
        return pydantic.create_model(name, __config__=pydantic.ConfigDict(extra="forbid"), **fields)

    def payload_schema(self) -> dict:
        return self.payload_model.model_json_schema()

    def validate_payload(self, payload: Any) -> dict:
        """Validate and normalise a payload; raises pydantic.ValidationError. Returns the JSON form stored."""
        model = self.payload_model.model_validate(payload if payload is not None else {})
        stored = model.model_dump(mode="json")
        # Postgres's jsonb can't hold a NUL or a lone surrogate; whatever the hints allow, such a payload is a
        # validation error naming the field (every caller shows those), not a database error later.
        found = find_unstorable(stored)
        if found:
            loc, reason = found
            error = PydanticCustomError("unstorable_text", reason)
            raise pydantic.ValidationError.from_exception_data(
                self.payload_model.__name__, [{"type": error, "loc": tuple(loc), "input": "…"}]
            )
        return stored

    def call_arguments(self, payload: dict) -> dict[str, Any]:
        """Keyword arguments for the task function from a stored payload."""
        model = self.payload_model.model_validate(payload)
        if self.model_param:
            return {self.model_param: model}
        return {name: getattr(model, name) for name in type(model).model_fields}


def task(
    id: str,
    *,
    retry: Retry | None = None,
    max_duration: timedelta | float | None = None,
    timeout: timedelta | float | None = None,
    concurrency: int | None = None,
    concurrency_key: str | None = None,
    rate_limit: tuple[int, timedelta | float] | None = None,
    rate_key: str | None = None,
    debounce: timedelta | float | None = None,
    debounce_key: str | None = None,
    priority: int = 0,
    queue: str | None = None,
    idempotency_ttl: timedelta | float | None = None,
    events: list[str] | tuple[str, ...] = (),
    schedule: str | None = None,
    budget_usd: float | None = None,
    alerts: list[str] | tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Task]:
    """Register a function as a Dex task. The function takes the run context first, then its payload.

    Flow control (enforced in Postgres when a run is claimed, across all workers; see runs/engine/flow.py):

    - `concurrency=N`: at most N runs of the task execute at once; with `concurrency_key="user_id"` (a
      dotted path into the payload) at most N *per key*. A parked run (sleep, wait) holds no slot. Runs over
      the limit stay queued without holding a worker and start as slots free up, highest `priority` first.
    - `rate_limit=(n, period)`: at most n runs *start* in any `period`-long window (sliding window; `period`
      a timedelta or seconds), per `rate_key` (default: `concurrency_key`) if given. Runs over the limit wait
      queued until the window allows them — they are delayed, never dropped (Inngest calls this "throttle").
    - `debounce=period` (a timedelta or seconds), per `debounce_key` if given: a trigger waits out `period`
      of quiet; a later trigger of the same key within it supersedes it (the earlier run ends `canceled`,
      saying which run replaced it), so only the last trigger's payload runs. Child runs (`ctx.invoke`) are
      never debounced: their parent waits on them.
    - `priority` (int, higher first; a trigger may override it): orders the claim among runs waiting for a
      slot, and sets the broker message priority.
    - `queue`: the Celery queue of the task's runs (`celery -A dexweb worker -Q agents` serves it).
    """
    if not id or not isinstance(id, str):
        raise ValueError("a task needs a non-empty string id")
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if concurrency_key and concurrency is None:
        raise ValueError("concurrency_key needs concurrency=N (the limit per key)")
    if rate_key and rate_limit is None:
        raise ValueError("rate_key needs rate_limit=(n, period)")
    if debounce_key and debounce is None:
        raise ValueError("debounce_key needs debounce=period")
    if rate_limit is not None and (
        not isinstance(rate_limit, tuple | list) or len(rate_limit) != 2 or int(rate_limit[0]) < 1
    ):
        raise ValueError("rate_limit must be (n, period) with n ≥ 1, e.g. (5, timedelta(seconds=10))")

    def decorate(fn: Callable[..., Any]) -> Task:
        limit = None
        if rate_limit is not None:
            count, period = rate_limit
            limit = (int(count), _seconds(period, "rate_limit period"))
        t = Task(
            id=id,
            fn=fn,
            retry=retry or DEFAULT_RETRY,
            max_duration=_seconds(max_duration, "max_duration"),
            timeout=_seconds(timeout, "timeout"),
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            rate_limit=limit,
            rate_key=rate_key,
            debounce=_seconds(debounce, "debounce"),
            debounce_key=debounce_key,
            priority=priority,
            queue=queue,
            idempotency_ttl=_seconds(idempotency_ttl, "idempotency_ttl"),
            events=list(events),
            schedule=schedule,
            budget_usd=budget_usd,
            alerts=_alert_targets(alerts),
            description=inspect.getdoc(fn) or "",
        )
        registry.register(t)
        return t

    return decorate


def parse_alert_target(value: str) -> tuple[str, str]:
    """An `alerts=[...]` entry as (channel, target): an http(s) URL is a webhook, an address (optionally
    `mailto:`) an email. Raises ValueError for anything else."""
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return "webhook", value
    address = value.removeprefix("mailto:")
    local, at, domain = address.partition("@")
    if at and local and "." in domain and " " not in address:
        return "email", address
    raise ValueError(f"alert destination {value!r} is neither an http(s) URL nor an email address")


def _alert_targets(values: list[str] | tuple[str, ...]) -> list[str]:
    """`alerts=[...]`, checked when the task is defined (a typo fails at import, not at 3 a.m.)."""
    if isinstance(values, str):
        raise ValueError("alerts must be a list of webhook URLs and email addresses, not one string")
    return [parse_alert_target(value)[1] for value in values]
