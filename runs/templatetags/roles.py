"""`{% load roles %}` then `{% if user|is_operator %}`: viewers see no action buttons."""

from __future__ import annotations

from typing import Any

from django import template

from runs.ops import audit

register = template.Library()


@register.filter
def is_operator(user: Any) -> bool:
    return audit.is_operator(user)
