"""Tasks written with agent frameworks (Pydantic AI, the OpenAI Agents SDK), for the integration tests.

Imported by the tests that use them and, via DEX_AGENT_MODULES, by their workers. Tools write to an external
ledger (the path travels as the agent's deps / context), so a test counts how often each really ran.

TRIP_SCRIPT drives the local LLM server (runs.ai.testserver) through a four-call conversation: lookup the
order, then the weather, then advice, then the structured answer. Each rule matches text that only the
tool results from that point on contain; the most advanced state comes first.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from pydantic_ai import Agent, ModelRetry, NativeOutput, RunContext
from pydantic_ai.mcp import MCPToolset

from runs.integrations.pydantic_ai import DexAgent, dex_model
from runs.sdk import Retry, task
from tests.agents import ledger_lines, record

FINAL = {"city": "Lisbon", "temperature_c": 21, "advice": "pack sunglasses"}
TRIP_RULES = [
    {"contains": "pack sunglasses", "tool_calls": [{"name": "final_result", "arguments": FINAL}]},
    {"contains": "21C sunny", "tool_calls": [{"name": "advise", "arguments": {"weather": "21C sunny"}}]},
    {"contains": "is in Lisbon", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]},
    {"contains": "trip", "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "A-7"}}]},
]


def trip_script(*, third_call_delay: float = 0.0) -> dict:
    """The four-call conversation; with a delay, the third model call (the first to see the weather)
    hangs that long, once, so a test can kill the worker while it is in flight."""
    rules = [dict(rule) for rule in TRIP_RULES]
    if third_call_delay:
        delayed = {**rules[1], "times": 1, "delay": third_call_delay}
        rules.insert(1, delayed)
    return {"rules": rules}


class TripAdvice(BaseModel):
    city: str
    temperature_c: int
    advice: str


def trip_agent(*, stream: bool = True) -> DexAgent:
    # Built per run: dex_model reads the provider configuration (DEX_LLM_PROVIDERS) in force now.
    agent = Agent(
        dex_model("gpt-5-mini"),
        name="trip",
        deps_type=str,
        output_type=TripAdvice,
        instructions="You plan trips. Use the tools, then answer.",
    )

    @agent.tool
    def lookup_order(ctx: RunContext[str], order_id: str) -> str:
        """Where an order ships to."""
        record(ctx.deps, f"lookup_order {order_id}")
        return f"order {order_id} is in Lisbon"

    @agent.tool
    def get_weather(ctx: RunContext[str], city: str) -> str:
        """The weather in a city."""
        record(ctx.deps, f"get_weather {city}")
        return f"{city}: 21C sunny"

    @agent.tool
    def advise(ctx: RunContext[str], weather: str) -> str:
        """What to pack for some weather."""
        record(ctx.deps, f"advise {weather}")
        return "pack sunglasses"

    return DexAgent(agent, stream=stream)


@task("t-pai-trip", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def pai_trip(ctx, ledger: str, prompt: str = "plan my trip for order A-7") -> dict:
    result = trip_agent().run_sync(prompt, deps=ledger)
    return {
        "advice": result.output.model_dump(),
        "messages": len(result.all_messages()),
        "requests": result.usage.requests,
    }


@task("t-pai-trip-async", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
async def pai_trip_async(ctx, ledger: str) -> dict:
    result = await trip_agent().run("plan my trip for order A-7", deps=ledger)
    return {"advice": result.output.model_dump()}


@task("t-pai-flaky-tool", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def pai_flaky_tool(ctx, ledger: str) -> dict:
    """The weather tool fails its first attempt (an exception: the step retries), the advice tool asks the
    model to try again once (ModelRetry: an outcome the model sees, recorded)."""
    agent = Agent(dex_model("gpt-5-mini"), name="trip", deps_type=str, output_type=TripAdvice)

    @agent.tool
    def lookup_order(ctx: RunContext[str], order_id: str) -> str:
        """Where an order ships to."""
        record(ctx.deps, f"lookup_order {order_id}")
        return f"order {order_id} is in Lisbon"

    @agent.tool
    def get_weather(ctx: RunContext[str], city: str) -> str:
        """The weather in a city."""
        record(ctx.deps, f"get_weather {city}")
        if ledger_lines(ctx.deps).count(f"get_weather {city}") == 1:
            raise ConnectionError("the weather service is down")
        return f"{city}: 21C sunny"

    @agent.tool
    def advise(ctx: RunContext[str], weather: str) -> str:
        """What to pack for some weather."""
        record(ctx.deps, f"advise {weather}")
        if ledger_lines(ctx.deps).count(f"advise {weather}") == 1:
            raise ModelRetry("say the weather again, please")
        return "pack sunglasses"

    result = DexAgent(agent).run_sync("plan my trip for order A-7", deps=ledger)
    return {"advice": result.output.model_dump(), "messages": len(result.all_messages())}


@task("t-pai-text", retry=Retry(attempts=1))
def pai_text(ctx, prompt: str) -> str:
    agent = Agent(dex_model("gpt-5-mini"), name="packer")
    return DexAgent(agent).run_sync(prompt).output


@task("t-pai-in-step", retry=Retry(attempts=1))
def pai_in_step(ctx) -> str:
    agent = DexAgent(Agent(dex_model("gpt-5-mini"), name="packer"))
    return ctx.step("nested", lambda: agent.run_sync("hello").output)


MCP_SERVER = str(Path(__file__).with_name("mcp_server.py"))


@task("t-pai-mcp", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def pai_mcp(ctx, ledger: str) -> dict:
    """An MCP server's tool call as a step; a step after the agent fails once, so the run executes again
    from the top and must not call the MCP tool (or the model) a second time."""
    agent = Agent(dex_model("gpt-5-mini"), name="travel", toolsets=[MCPToolset(MCP_SERVER, id="travel-log")])
    answer = DexAgent(agent).run_sync(f"log my visit to Lisbon in {ledger}").output
    ctx.step("after", _fails_once, ledger)
    return {"answer": answer}


def _fails_once(ledger: str) -> str:
    record(ledger, "after")
    if ledger_lines(ledger).count("after") == 1:
        raise ConnectionError("flaky")
    return "ok"


@task("t-pai-native-output", retry=Retry(attempts=1))
def pai_native_output(ctx, prompt: str) -> dict:
    """Structured output through the provider's JSON schema mode (response_format), not an output tool."""
    agent = Agent(dex_model("gpt-5-mini"), name="planner", output_type=NativeOutput(TripAdvice))
    result = DexAgent(agent).run_sync(prompt)
    return result.output.model_dump()
