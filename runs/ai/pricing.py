"""What an LLM call costs: USD per million input and output tokens, by model name.

A model's price is the entry with the longest name that the model's name starts with, so a dated snapshot
(`gpt-4o-mini-2024-07-18`) costs what its family (`gpt-4o-mini`) does and never what a shorter prefix (`gpt-4o`)
does. `DEX_LLM_PRICING` (a setting, else the environment variable as JSON) adds entries or replaces ours:
`{"my-model": {"input": 0.5, "output": 1.5}}` or `{"my-model": [0.5, 1.5]}`. The table is a snapshot of list
prices; a deployment that cares about exact billing overrides it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal("0.00000001")  # a hundred-millionth of a dollar: finer than any token's price


@dataclass(frozen=True)
class Price:
    input: Decimal  # USD per 1M input tokens
    output: Decimal  # USD per 1M output tokens


def _price(input_usd: str, output_usd: str) -> Price:
    return Price(Decimal(input_usd), Decimal(output_usd))


PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5": _price("1.25", "10"),
    "gpt-5-mini": _price("0.25", "2"),
    "gpt-5-nano": _price("0.05", "0.40"),
    "gpt-4.1": _price("2", "8"),
    "gpt-4.1-mini": _price("0.40", "1.60"),
    "gpt-4.1-nano": _price("0.10", "0.40"),
    "gpt-4o": _price("2.50", "10"),
    "gpt-4o-mini": _price("0.15", "0.60"),
    "gpt-4-turbo": _price("10", "30"),
    "gpt-3.5-turbo": _price("0.50", "1.50"),
    "o1": _price("15", "60"),
    "o1-mini": _price("1.10", "4.40"),
    "o3": _price("2", "8"),
    "o3-mini": _price("1.10", "4.40"),
    "o4-mini": _price("1.10", "4.40"),
    # Anthropic
    "claude-opus-4-5": _price("5", "25"),
    "claude-opus-4": _price("15", "75"),
    "claude-sonnet-4": _price("3", "15"),
    "claude-haiku-4-5": _price("1", "5"),
    "claude-haiku": _price("1", "5"),  # the alias the design's examples use
    "claude-3-7-sonnet": _price("3", "15"),
    "claude-3-5-sonnet": _price("3", "15"),
    "claude-3-5-haiku": _price("0.80", "4"),
    "claude-3-opus": _price("15", "75"),
    "claude-3-haiku": _price("0.25", "1.25"),
    # The local development server: free.
    "local-": _price("0", "0"),
    "dex-": _price("0", "0"),
}


def price_table() -> dict[str, Price]:
    """Our table with `DEX_LLM_PRICING` laid over it."""
    raw = getattr(settings, "DEX_LLM_PRICING", None) or os.environ.get("DEX_LLM_PRICING") or None
    if not raw:
        return PRICES
    return {**PRICES, **parse_pricing(raw)}


def parse_pricing(raw: Mapping[str, Any] | str) -> dict[str, Price]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ImproperlyConfigured(f"DEX_LLM_PRICING is not valid JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured("DEX_LLM_PRICING must be an object of model -> price")
    table = {}
    for model, value in raw.items():
        try:
            if isinstance(value, Mapping):
                price = Price(Decimal(str(value["input"])), Decimal(str(value["output"])))
            else:
                input_usd, output_usd = value
                price = Price(Decimal(str(input_usd)), Decimal(str(output_usd)))
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            raise ImproperlyConfigured(
                f"DEX_LLM_PRICING[{model!r}] must be {{'input': usd, 'output': usd}} or [input, output]"
            ) from exc
        table[model.removesuffix("*")] = price
    return table


def price_for(model: str) -> Price | None:
    """The price of `model`, or None when no entry matches it (its cost is then unknown, not zero)."""
    table = price_table()
    if model in table:
        return table[model]
    matches = [name for name in table if model.startswith(name)]
    return table[max(matches, key=len)] if matches else None


def cost_usd(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    """What the call cost in USD, to 1e-8; zero for a model not in the table (see `price_for`)."""
    price = price_for(model)
    if price is None:
        return Decimal(0).quantize(COST_QUANTUM)
    cost = (price.input * input_tokens + price.output * output_tokens) / MILLION
    return cost.quantize(COST_QUANTUM)
