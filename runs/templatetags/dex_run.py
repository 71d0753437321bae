"""Template filters of the run page. They return plain data or plain strings: autoescaping still applies, and
nothing here marks anything safe — a run's payload, outputs, logs and LLM text are shown as text, inert — except
`markdown`, whose HTML nh3 has sanitized."""

from __future__ import annotations

import json
from typing import Any

import nh3
from django import template
from django.conf import settings
from django.utils.safestring import mark_safe
from markdown_it import MarkdownIt

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
def epoch_ms(value: Any) -> int | str:
    """A datetime as milliseconds since the epoch (what static/js/dex.js lays the trace out from)."""
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else ""


@register.simple_tag
def default_queue() -> str:
    return settings.DEX_DEFAULT_QUEUE


@register.filter
def llm_text(output: Any) -> str | None:
    """The text an LLM step answered (its output is a runs.ai Completion as a dict), or None."""
    if isinstance(output, dict) and isinstance(output.get("text"), str):
        return output["text"]
    return None


@register.simple_tag
def step_segments(
    step: Any, timeline: fragments.Timeline | None, live_status: str | None = None, live_attempt: Any = None
) -> list[fragments.Segment]:
    """The stretches of a step on the run's time axis (attempts, back-offs, waits): fragments.Timeline."""
    if timeline is None:
        return []
    attempt = int(live_attempt) if live_attempt else None
    return timeline.segments(step, live_status=live_status or None, live_attempt=attempt)


@register.filter
def transcript(meta: Any) -> list[dict[str, str]]:
    """The messages an LLM step sent (its recorded, redacted request), as role and text."""
    request = (meta or {}).get("exchange", {}).get("request") if isinstance(meta, dict) else None
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return []
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False, default=str)
        out.append({"role": str(message.get("role", "")), "content": content})
    return out


# What agent docstrings may use once rendered: text formatting, lists, code, links. No raw HTML (markdown-it's
# html=False escapes it) and no scripts, styles, images or event handlers (nh3 drops them whatever comes).
_MARKDOWN_TAGS = {"p", "br", "em", "strong", "code", "pre", "ul", "ol", "li", "a", "blockquote", "h3", "h4", "hr"}


@register.filter
def markdown(text: Any) -> str:
    """An agent's docstring as Markdown, made safe with nh3 (only the tags above; links get rel=noopener)."""
    html = MarkdownIt("commonmark", {"html": False}).render(str(text or ""))
    cleaned = nh3.clean(
        html, tags=_MARKDOWN_TAGS, attributes={"a": {"href", "title"}}, url_schemes={"http", "https", "mailto"}
    )
    return mark_safe(cleaned)  # noqa: S308 - sanitized by nh3 just above
