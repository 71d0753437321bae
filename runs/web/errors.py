"""The dashboard's own error pages (400, 403, 404, 500), never Django's debug page, even with DEBUG on.

A plain request gets a page in the dashboard's layout; an htmx request gets a short notice that static/js/dex.js
shows in the page's error slot (`#dex-error`): a document swapped into a region would break the page. The API
has its JSON errors (runs.api); these handlers leave /api/ alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

TITLES = {
    400: ("Bad request", "The request couldn't be understood: a form field too large, or a malformed value."),
    403: ("Not allowed", "You don't have permission to do this. Ask an admin to add you to the “operator” group."),
    413: ("Form too large", "The form is too large to accept. Go back and shorten it."),
    404: ("Not found", "There is nothing here: the run, task or page may have been removed, or the link is wrong."),
    500: ("Something went wrong", "Dex hit an error it didn't expect. It has been logged; try again in a moment."),
}
# How Django's technical (DEBUG) pages say what they are: what the middleware below replaces.
DEBUG_PAGE_MARK = b"you have <code>DEBUG = True</code>"


def error_response(request: HttpRequest, status: int, text: str | None = None) -> HttpResponse:
    title, default_text = TITLES[status]
    text = text or default_text
    context = {"status": status, "title": title, "text": text, "path": request.path}
    if request.headers.get("HX-Request") == "true":
        html = render_to_string("errors/fragment.html", context)
        # 200: htmx swaps no 4xx/5xx response; the status travels in X-Dex-Error, the notice to #dex-error.
        response = HttpResponse(html)
        response["X-Dex-Error"] = str(status)
        response["HX-Retarget"] = "#dex-error"
        response["HX-Reswap"] = "innerHTML"
        return response
    try:
        html = render_to_string("errors/page.html", context, request=request)
    except Exception:  # a broken template or context processor must not turn a 500 page into a second error
        logger.exception("the error page itself failed to render")
        html = f"<!doctype html><title>{title}</title><h1>{title}</h1><p>{text}</p>"
    return HttpResponse(html, status=status)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(request, 400)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(request, 403)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(request, 404)


def server_error(request: HttpRequest) -> HttpResponse:
    return error_response(request, 500)


class DebugPageMiddleware:
    """With DEBUG on, Django answers a 404 with its URL list and an exception with its settings dump: replace
    either with the dashboard's page (the traceback still goes to the log). Innermost, so it sees the response
    Django made of a view's (or the URL resolver's) exception. Without DEBUG the handlers above serve."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        status = response.status_code
        if status not in TITLES and status >= 400:
            status = 500 if status >= 500 else 400
        if (
            response.status_code >= 400
            and not response.streaming
            and not request.path.startswith("/api/")
            and DEBUG_PAGE_MARK in response.content
        ):
            return error_response(request, status)
        return response


class FormSizeMiddleware:
    """A dashboard form over Django's DATA_UPLOAD_MAX_MEMORY_SIZE: the dashboard's 413 (a page, or for htmx the
    notice), saying the size and the limit, where Django would answer a bare 400 (or, with DEBUG, its debug
    page). The API refuses its own oversize bodies with JSON (runs.api.middleware)."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if not request.path.startswith("/api/") and limit is not None and length > limit:
            return form_too_large(request, length)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        # A body sent without a Content-Length (chunked) is only found too large when a view reads it.
        if isinstance(exception, RequestDataTooBig) and not request.path.startswith("/api/"):
            return form_too_large(request, None)
        return None


def form_too_large(request: HttpRequest, length: int | None) -> HttpResponse:
    size = f"{length:,} bytes" if length is not None else "over the limit"
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    text = f"The form is too large to accept ({size}; the limit is {limit:,} bytes). Go back and shorten it."
    return error_response(request, 413, text)
