"""Tasks the test suite runs (imported by the test process and, via DEX_AGENT_MODULES, by test workers).

Side effects go to an external ledger (a file named in the payload), appended with O_APPEND so lines
from several processes never interleave: the ledger is how tests count executions a crash can't hide."""

from __future__ import annotations

import os
import time
from pathlib import Path

from runs.sdk import NonRetriableError, Retry, task


def record(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def ledger_lines(ledger: str | Path) -> list[str]:
    path = Path(ledger)
    return path.read_text().splitlines() if path.exists() else []


def _ledgered(ledger: str, key: str, value, pause: float = 0.0):
    record(ledger, key)
    if pause:
        time.sleep(pause)
    return value


@task("t-ten-steps", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def ten_steps(ctx, ledger: str, pause: float = 0.0, steps: int = 10) -> dict:
    total = 0
    for i in range(1, steps + 1):
        total += ctx.step(f"s{i}", _ledgered, ledger, f"s{i}", i, pause)
    return {"total": total}


@task("t-flaky", retry=Retry(attempts=5, initial=0.05, backoff=1.0, max_delay=0.1))
def flaky(ctx, ledger: str, failures: int = 2) -> str:
    ctx.step("before", _ledgered, ledger, "before", 1)

    def sometimes() -> str:
        record(ledger, f"flaky attempt {ctx.attempt}")
        if ctx.attempt <= failures:
            raise ConnectionError(f"boom on attempt {ctx.attempt}")
        return "ok"

    result = ctx.step("flaky", sometimes)
    ctx.step("after", _ledgered, ledger, "after", 2)
    return result


@task("t-fails", retry=Retry(attempts=2, initial=0.05))
def always_fails(ctx, ledger: str, nonretriable: bool = False) -> None:
    ctx.step("ok", _ledgered, ledger, "ok", 1)

    def bad() -> None:
        record(ledger, "bad")
        if nonretriable:
            raise NonRetriableError("this input can never work")
        raise ValueError("the step is broken")

    ctx.step("bad", bad)


@task("t-bad-output")
def bad_output(ctx, kind: str = "object") -> None:
    if kind == "object":
        ctx.step("make", lambda: object())
    else:
        ctx.step("make", lambda: "x" * (2 * 1024 * 1024))


@task("t-switch", retry=Retry(attempts=3, initial=0.05))
def switch_order(ctx, flag_file: str) -> str:
    """Asks for steps in a different order once `flag_file` exists: a non-deterministic task."""
    ctx.step("a", lambda: 1)
    if Path(flag_file).exists():
        ctx.step("c", lambda: 3)
    else:
        ctx.step("b", lambda: 2)

        def fail_once() -> int:
            Path(flag_file).write_text("x")
            raise ConnectionError("fail once")

        ctx.step("fail-once", fail_once)
    return "done"


@task("t-typed")
def typed(ctx, name: str, count: int = 1, ratio: float = 0.5, loud: bool = False) -> str:
    return ctx.step("shout", lambda: (name.upper() if loud else name) * count)


@task("t-async", retry=Retry(attempts=3, initial=0.05))
async def async_task(ctx, ledger: str) -> int:
    import asyncio

    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        record(ledger, f"add {a} {b}")
        return a + b

    x = await ctx.step("one", add, 1, 2)
    y = await ctx.step("two", add, x, 3)
    return y


@task("t-slow-step", timeout=0.5, retry=Retry(attempts=2, initial=0.05))
def slow_step(ctx, ledger: str, seconds: float = 2.0) -> str:
    def slow() -> str:
        record(ledger, f"slow start {ctx.attempt}")
        time.sleep(seconds)
        record(ledger, "slow end")
        return "late"

    return ctx.step("slow", slow)


@task("t-max-duration", max_duration=1.0, retry=Retry(attempts=1))
def max_duration(ctx, ledger: str) -> None:
    for i in range(10):
        ctx.step(f"tick{i}", _ledgered, ledger, f"tick{i}", i, 0.3)


@task("t-metadata")
def metadata(ctx, ledger: str) -> str:
    ctx.set_metadata("progress", 0.5)
    ctx.log.info("outside any step")
    ctx.step("one", lambda: ctx.log.warning("inside step one") or 1)
    ctx.set_metadata("progress", 1.0)
    return "ok"


@task("t-sleep")
def sleeper(ctx, ledger: str, seconds: float = 2.0) -> str:
    ctx.step("before", _ledgered, ledger, "before", 1)
    ctx.sleep("nap", seconds)
    ctx.step("after", _ledgered, ledger, "after", 2)
    return "rested"


@task("t-logs-between")
def logs_between(ctx, ledger: str) -> str:
    ctx.log.info("before the nap")
    ctx.step("before", _ledgered, ledger, "before", 1)
    ctx.sleep("nap", 60)
    ctx.log.info("after it")
    return ctx.step("after", _ledgered, ledger, "after", 2)


@task("t-wait-event")
def wait_event(ctx, topic: str, timeout: float | None = None) -> dict:
    verdict = ctx.wait_for_event("review", event="report.reviewed", match={"topic": topic}, timeout=timeout)
    return {"verdict": verdict}


@task("t-approval")
def wait_approval(ctx, order: str) -> dict:
    from tests import forms as test_forms

    answer = ctx.wait_for_approval("refund", prompt=f"Refund order {order}?", form=test_forms.RefundForm)
    ctx.step("after", lambda: "done")
    return {"answer": answer}


@task("t-on-signup", events=["user.signed_up"])
def on_signup(ctx, email: str) -> str:
    return ctx.step("welcome", lambda: f"welcome {email}")


@task("t-cron", schedule="0 0 1 1 *")
def yearly(ctx) -> str:
    """A code-declared schedule (yearly, so it never fires during a test): schedulers sync it at start."""
    return ctx.step("tick", lambda: "tick")


@task("t-child")
def child(ctx, n: int, fail: bool = False, pause: float = 0.0) -> int:
    def square() -> int:
        if pause:
            time.sleep(pause)
        if fail:
            raise NonRetriableError(f"child {n} refuses")
        return n * n

    return ctx.step("square", square)


@task("t-parent")
def parent(ctx, n: int = 3, fail: bool = False) -> dict:
    from runs.sdk import ChildRunFailed

    squares = ctx.map("squares", "t-child", [{"n": i} for i in range(n)])
    try:
        one = ctx.invoke("one", "t-child", {"n": 7, "fail": fail})
    except ChildRunFailed as exc:
        one = f"failed: {exc.error.get('message')}"
    return {"squares": squares, "one": one}


@task("t-parent-sleepy-child")
def parent_waiting(ctx) -> int:
    return ctx.invoke("sleepy", "t-sleep", {"ledger": "/dev/null", "seconds": 3600})


@task("t-saga", retry=Retry(attempts=2, initial=0.05))
def booking_saga(ctx, ledger: str, fail_at: str = "car", pause: float = 0.0) -> dict:
    def book(what: str) -> str:
        record(ledger, f"book {what}")
        if what == fail_at:
            raise NonRetriableError(f"no {what} available")
        return f"{what}-123"

    def cancel(booking: str) -> None:
        record(ledger, f"cancel {booking}")
        if pause:
            time.sleep(pause)

    flight = ctx.step("flight", book, "flight", compensate=cancel)
    hotel = ctx.step("hotel", book, "hotel", compensate=cancel)
    car = ctx.step("car", book, "car", compensate=cancel)
    return {"flight": flight, "hotel": hotel, "car": car}


@task("t-llm-chain", retry=Retry(attempts=1))
def llm_chain(ctx, topic: str, fail_last: str = "", stream: bool = False) -> dict:
    plan = ctx.ai.infer("plan", model="gpt-5-mini", messages=[{"role": "user", "content": f"plan {topic}"}])
    draft = ctx.ai.infer(
        "draft", model="gpt-5-mini", messages=[{"role": "user", "content": f"draft {plan.text}"}], stream=stream
    )
    final = ctx.ai.infer(
        "final",
        model="gpt-5-mini",
        messages=[{"role": "user", "content": f"finish {draft.text} {fail_last}"}],
    )
    return {"text": final.text, "model": final.model}


@task("t-llm-failover")
def llm_failover(ctx) -> str:
    answer = ctx.ai.infer(
        "ask",
        model="gpt-5-mini",
        fallbacks=["claude-haiku"],
        messages=[{"role": "user", "content": "hello [[model-down: gpt-5-mini]]"}],
    )
    return answer.model


@task("t-llm-budget", budget_usd=0.000001)
def llm_budget(ctx) -> str:
    return ctx.ai.infer("ask", model="gpt-5-mini", messages=[{"role": "user", "content": "a costly question"}]).text


def lookup_order(order_id: str) -> dict:
    """Look an order up by its id."""
    import os as _os

    ledger = _os.environ.get("DEX_TEST_TOOL_LEDGER")
    if ledger:
        record(ledger, f"lookup {order_id}")
    return {"order": order_id, "status": "shipped"}


@task("t-llm-tools")
def llm_tools(ctx, question: str) -> str:
    answer = ctx.ai.run_tools(
        "support",
        model="gpt-5-mini",
        messages=[{"role": "user", "content": question}],
        tools=[lookup_order],
    )
    return answer.text


def refund_order(order_id: str, ledger: str) -> dict:
    """Refund an order (slowly: the payment provider takes its time)."""
    record(ledger, f"refund start {order_id}")
    time.sleep(2.0)
    record(ledger, f"refund done {order_id}")
    return {"order": order_id, "refunded": True}


def check_order(order_id: str, ledger: str) -> dict:
    """Check an order's status."""
    record(ledger, f"check {order_id}")
    return {"order": order_id, "status": "damaged"}


@task("t-llm-tools-slow")
def llm_tools_slow(ctx, ledger: str) -> str:
    question = (
        f'my order B-1 arrived broken [[tool: check_order {{"order_id": "B-1", "ledger": "{ledger}"}}]]'
        f' [[tool: refund_order {{"order_id": "B-1", "ledger": "{ledger}"}}]]'
    )
    return ctx.ai.run_tools(
        "support",
        model="gpt-5-mini",
        messages=[{"role": "user", "content": question}],
        tools=[check_order, refund_order],
    ).text
