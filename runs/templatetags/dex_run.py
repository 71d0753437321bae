"""Template filters of the run page. They return plain data or plain strings: autoescaping still applies, and
nothing here marks anything safe — a run's payload, outputs, logs and LLM text are shown as text, inert."""

from __future__ import annotations

import json
from typing import Any

from django import template

from runs.web import fragments

register = template.Library()

# A JSON viewer shows this many characters of the pretty-printed value; the rest is a download away.
JSON_PREVIEW_CHARS = 20_000


@register.filter
def json_view(value: Any) -> dict[str, Any]:
    """{"text", "truncated", "size"}: the value pretty-printed (cut at JSON_PREVIEW_CHARS) and its size in
    bytes as compact JSON (what is stored)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    size = len(json.dumps(value, ensure_ascii=False, default=str).encode())
    truncated = len(text) > JSON_PREVIEW_CHARS
    return {"text": text[:JSON_PREVIEW_CHARS] if truncated else text, "truncated": truncated, "size": size}


@register.filter
def step_bar(step: Any, timeline: fragments.Timeline | None) -> str:
    """The inline style placing a step's bar on the run's timeline ("" for a step not timed yet)."""
    bar = timeline.bar(step) if timeline is not None else None
    if bar is None:
        return ""
    return f"left:{bar[0]}%;width:{bar[1]}%"


@register.filter
def lookup(mapping: Any, key: Any) -> Any:
    """mapping[key], or None: a dict keyed by step key, read from a step row."""
    if isinstance(mapping, dict):
        return mapping.get(key)
    return None


@register.filter
def llm_text(output: Any) -> str | None:
    """The text an LLM step answered (its output is a runs.ai Completion as a dict), or None."""
    if isinstance(output, dict) and isinstance(output.get("text"), str):
        return output["text"]
    return None
