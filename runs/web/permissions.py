"""Who may do what in the dashboard: everyone logged in reads; operators (runs.operate_runs) act."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

from runs.ops.audit import is_operator

View = TypeVar("View", bound=Callable[..., HttpResponse])


def operator_required(view: View) -> View:
    """Anonymous visitors go to the login page; logged-in viewers get 403; operators get the view."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_operator(request.user):
            raise PermissionDenied("only operators can act on runs")
        return view(request, *args, **kwargs)

    return login_required(wrapper)  # type: ignore[return-value]
