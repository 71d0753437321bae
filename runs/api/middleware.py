from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from runs.text import unstorable_reason

# The codes runs.api.views answers with, for the statuses Django or a library answers before (or instead of)
# an API endpoint: a wrong method, a CSRF refusal, a body Django couldn't parse, an unexpected error.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_content_type",
    422: "validation_error",
    429: "throttled",
}
# Headers that carry meaning for the client and must survive the rewrite.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


def _is_json(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").split(";")[0].strip() == "application/json"


def _json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


class ApiJsonErrorsMiddleware:
    """Every error under /api/ is `{"error": {code, message}}` JSON, whoever produced it.

    The endpoints answer their own errors as JSON (runs.api.views); this catches the rest: the 405 django-ninja
    answers for a wrong method (as `text/html`, with its `Allow` header, which is kept), an empty 400 for a
    multipart body Django couldn't parse, Django's HTML 404/500 pages. It also refuses a path holding a NUL
    before any view can hand it to Postgres, which can't store one (`/api/waitpoints/%00/complete`).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith("/api/"):
            return self.get_response(request)
        reason = unstorable_reason(request.path)
        if reason:
            return _json_error(400, "invalid_path", f"the path is not valid: {reason}")
        response = self.get_response(request)
        if response.status_code < 400 or _is_json(response):
            return response
        status = response.status_code
        if status == 405:
            allowed = response.get("Allow", "")
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed or 'none'}"
        elif status >= 500:
            message = "an unexpected error occurred; it has been logged"
        else:
            message = _phrase(status)
        code = "internal_error" if status >= 500 else _CODES.get(status, "error")
        converted = _json_error(status, code, message)
        for header in _KEPT_HEADERS:
            if header in response:
                converted[header] = response[header]
        return converted


class ApiBodyLimitMiddleware:
    """Refuse API bodies over the payload limit with a JSON 413 before anything reads them (a dashboard form
    over its limit is runs.web.errors.FormSizeMiddleware's)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.DEX_MAX_PAYLOAD_BYTES
        if request.path.startswith("/api/") and length > limit:
            return _json_error(
                413, "payload_too_large", f"the request body is {length:,} bytes; the limit is {limit:,} bytes"
            )
        return self.get_response(request)
