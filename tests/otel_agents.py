"""Tasks the tracing tests run (imported by the test process and, via DEX_AGENT_MODULES, by their worker)."""

from __future__ import annotations

from runs.sdk import Retry, task
from tests.agents import record


def _flaky(ledger: str, attempt: int, failures: int) -> str:
    record(ledger, f"flaky attempt {attempt}")
    if attempt <= failures:
        raise ConnectionError(f"boom on attempt {attempt}")
    return f"ok on attempt {attempt}"


@task("t-traced", retry=Retry(attempts=3, initial=0.05, backoff=1.0, max_delay=0.1))
def traced(ctx, ledger: str, failures: int = 1, llm: bool = False, child: bool = False) -> dict:
    out = {"before": ctx.step("before", record, ledger, "before")}
    out["flaky"] = ctx.step("flaky", lambda: _flaky(ledger, ctx.attempt, failures))
    if llm:
        out["llm"] = ctx.ai.infer("ask", model="gpt-5-mini", messages=[{"role": "user", "content": "trace me"}]).text
    if child:
        out["child"] = ctx.invoke("child", "t-traced-child", {"ledger": ledger})
    out["after"] = ctx.step("after", record, ledger, "after")
    return out


@task("t-traced-child")
def traced_child(ctx, ledger: str) -> str:
    ctx.step("child-step", record, ledger, "child-step")
    return "child done"


def _current_span_id() -> str:
    from opentelemetry import trace  # only where tracing is tested

    return format(trace.get_current_span().get_span_context().span_id, "016x")


@task("t-traced-current")
def traced_current(ctx) -> str:
    return ctx.step("whoami", _current_span_id)


@task("t-traced-async")
async def traced_async(ctx) -> dict:
    async def current() -> str:
        return _current_span_id()

    return {"coroutine": await ctx.step("coroutine", current), "function": await ctx.step("function", _current_span_id)}
