"""Template filters of the dashboard. They return plain strings: autoescaping still applies."""

from __future__ import annotations

import json
from typing import Any

from django import template

from runs.web import fragments

register = template.Library()


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@register.filter
def duration(seconds: float | None) -> str:
    """850 ms, 12.3 s, 4m 05s, 2h 03m."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def step_dom_id(step: Any) -> str:
    return fragments.step_dom_id(step)
