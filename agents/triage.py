"""triage-agent: an OpenAI Agents SDK agent that hands a customer's message off to billing or shipping.

The triage agent only routes; billing looks orders up and refunds duplicate charges, shipping tracks parcels.
`run_agent` makes each model call, each tool call and the handoff a step of the run: kill the worker after
the handoff and the run resumes with the billing agent, without asking the triage model again or refunding
twice.

Runs offline against the local LLM server (`manage.py dev` starts one), which routes by the words the
message shares with each team's description and calls each of that team's tools once, and for real with an
API key ("gpt-5-mini"). Needs the `openai-agents` extra (installed by `uv sync`); without it the task fails
saying so. The orders are a small fixture in this module, so every run gives the same answers.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field

from runs.integrations import missing_extra
from runs.sdk import NonRetriableError, Retry, task

MODEL = "gpt-5-mini"
ORDERS = {
    "A-17": {"item": "kettle", "price": 39.0, "charges": 2, "parcel": "delivered on Monday"},
    "B-4": {"item": "desk lamp", "price": 24.5, "charges": 1, "parcel": "in transit, due Thursday"},
}
_ORDER_ID = re.compile(r"\b([A-Z]-\d+)\b")


def _order(text: str) -> tuple[str, dict] | tuple[None, None]:
    """The order a text names ("A-17"): the model may pass the id or a sentence holding it."""
    match = _ORDER_ID.search(text.upper())
    if match and match.group(1) in ORDERS:
        return match.group(1), ORDERS[match.group(1)]
    return None, None


def lookup_charges(order_id: str) -> dict:
    """Look up an order's item, price and how many times the customer was charged for it."""
    oid, order = _order(order_id)
    if order is None:
        return {"error": f"no order {order_id!r}; known orders: {', '.join(ORDERS)}"}
    return {"order": oid, "item": order["item"], "price": order["price"], "charges": order["charges"]}


def refund_duplicate_charge(order_id: str) -> dict:
    """Refund the duplicate charges of an order (charged more than once); nothing for an order charged once."""
    oid, order = _order(order_id)
    if order is None:
        return {"error": f"no order {order_id!r}"}
    extra = order["charges"] - 1
    return {"order": oid, "refunded": round(extra * order["price"], 2), "charges_refunded": extra}


def track_parcel(order_id: str) -> dict:
    """Where an order's parcel is."""
    oid, order = _order(order_id)
    return {"error": f"no order {order_id!r}"} if order is None else {"order": oid, "parcel": order["parcel"]}


def _sdk() -> tuple[Any, Any]:
    """The OpenAI Agents SDK and Dex's integration of it, imported when a run needs them rather than when a
    worker starts (which then never loads the SDK for a task it doesn't run)."""
    try:
        import agents

        from runs.integrations import openai_agents
    except ImportError as exc:  # the "openai-agents" extra isn't installed: the run fails saying so
        raise NonRetriableError(str(missing_extra("openai-agents", "The OpenAI Agents SDK", exc))) from exc
    return agents, openai_agents


def triage_agents() -> Any:
    """The triage agent (an `agents.Agent`) and the two teams it hands off to. The SDK is imported only here,
    so a worker that never runs this task never loads it."""
    try:
        from agents import Agent, function_tool
    except ImportError as exc:  # the "openai-agents" extra isn't installed: the run fails saying so
        raise NonRetriableError(
            f"{exc}: install Dex's 'openai-agents' extra (`uv sync --extra openai-agents`)"
        ) from exc
    billing = Agent(
        name="billing",
        handoff_description="Billing: a charge, charged twice, an invoice, a refund.",
        instructions="You resolve billing problems: look the charges up, refund duplicates, then say what you did.",
        tools=[function_tool(lookup_charges), function_tool(refund_duplicate_charge)],
        model=MODEL,
    )
    shipping = Agent(
        name="shipping",
        handoff_description="Shipping: where a parcel is, a delivery, tracking.",
        instructions="You answer questions about deliveries: track the parcel, then say where it is.",
        tools=[function_tool(track_parcel)],
        model=MODEL,
    )
    return Agent(
        name="triage",
        instructions="Hand the customer's message off to the team that can resolve it. Don't answer yourself.",
        handoffs=[billing, shipping],
        model=MODEL,
    )


@task("triage-agent", retry=Retry(attempts=3, initial=1.0), max_duration=timedelta(minutes=15))
def triage_agent(
    ctx, message: Annotated[str, Field(max_length=10_000)] = "I was charged twice for order A-17, please refund me."
) -> dict:
    """Routes a customer's message to billing or shipping (an OpenAI Agents SDK handoff), which resolves it
    with its tools; every model call, tool call and the handoff is a step."""
    _, integration = _sdk()
    result = integration.run_agent(ctx, triage_agents(), message)
    return {"team": result.last_agent.name, "reply": result.final_output}
