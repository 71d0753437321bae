"""Tasks written with the OpenAI Agents SDK (`import agents`), for the integration tests.

Imported by the tests that use them and, via DEX_AGENT_MODULES, by their workers. Tools write to the external
ledger passed as the run's context, so a test counts how often each really ran. The local LLM server drives
the conversations without a script: offered tools, it calls each once (the most relevant to the question
first), then answers (runs.ai.testserver).
"""

from __future__ import annotations

import sys
from pathlib import Path

from agents import Agent, RunConfig, RunContextWrapper, function_tool
from agents.mcp import MCPServerStdio

from runs.integrations.openai_agents import arun_agent, run_agent
from runs.sdk import Retry, task
from tests.agents import ledger_lines, record

MODEL = "gpt-5-mini"


@function_tool
def lookup_order(ctx: RunContextWrapper[str], order_id: str) -> str:
    """Where an order ships to."""
    record(ctx.context, "lookup_order")
    return "the order ships to Lisbon"


@function_tool
def get_weather(ctx: RunContextWrapper[str], city: str) -> str:
    """The weather in a city."""
    record(ctx.context, "get_weather")
    return "Lisbon: 21C sunny"


@function_tool(failure_error_function=None)  # an exception fails the tool's step (and retries it)
def advise(ctx: RunContextWrapper[str], weather: str) -> str:
    """What to pack for some weather."""
    record(ctx.context, "advise")
    if ledger_lines(ctx.context).count("advise") == 1 and "[flaky]" in weather:
        raise ConnectionError("the advice service is down")
    return "pack sunglasses"


trip = Agent(name="trip", instructions="Plan trips: use every tool, then answer.", model=MODEL)
trip.tools = [lookup_order, get_weather, advise]


@task("t-oa-trip", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def oa_trip(ctx, ledger: str, prompt: str = "plan my trip for order A-7", workflow: str = "") -> dict:
    run_config = RunConfig(workflow_name=workflow) if workflow else None
    result = run_agent(ctx, trip, prompt, context=ledger, run_config=run_config)
    return {"output": result.final_output, "items": len(result.new_items), "agent": result.last_agent.name}


@task("t-oa-trip-async", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
async def oa_trip_async(ctx, ledger: str) -> dict:
    result = await arun_agent(ctx, trip, "plan my trip for order A-7", context=ledger)
    return {"output": result.final_output}


@function_tool
def refund(ctx: RunContextWrapper[str], order_id: str) -> str:
    """Refund a charge on an order."""
    record(ctx.context, "refund")
    return "refunded"


billing = Agent(name="billing", instructions="Resolve refunds and charges.", tools=[refund], model=MODEL)
shipping = Agent(name="shipping", instructions="Track parcels and deliveries.", model=MODEL)
triage = Agent(name="triage", instructions="Hand off to the right team.", model=MODEL, handoffs=[billing, shipping])


@task("t-oa-triage", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
def oa_triage(ctx, ledger: str, question: str = "I was charged twice: refund my order") -> dict:
    result = run_agent(ctx, triage, question, context=ledger)
    ctx.step("after", _fails_once, ledger)
    return {"output": result.final_output, "agent": result.last_agent.name}


def _fails_once(ledger: str) -> str:
    record(ledger, "after")
    if ledger_lines(ledger).count("after") == 1:
        raise ConnectionError("flaky")
    return "ok"


MCP_SERVER = str(Path(__file__).with_name("mcp_server.py"))


@task("t-oa-mcp", retry=Retry(attempts=3, initial=0.05, max_delay=0.2))
async def oa_mcp(ctx, ledger: str) -> dict:
    """An MCP server's tool call as a step; a step after the agent fails once, so the run executes again from
    the top and must not call the MCP tool (or the model) a second time."""
    async with MCPServerStdio(params={"command": sys.executable, "args": [MCP_SERVER]}, name="travel-log") as server:
        agent = Agent(name="travel", instructions="Log visits.", model=MODEL, mcp_servers=[server])
        result = await arun_agent(ctx, agent, "log my visit to Lisbon")
    await ctx.step("after", _fails_once, ledger)
    return {"output": result.final_output}
