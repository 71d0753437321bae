"""Security headers on every response: a Content-Security-Policy, plus `X-Content-Type-Options` and
`Referrer-Policy` (Django's SecurityMiddleware sets those too, from SECURE_CONTENT_TYPE_NOSNIFF and
SECURE_REFERRER_POLICY; this makes sure they are there whatever those say).

The dashboard runs no inline script and no `eval`: scripts are files from our own origin (htmx, its ws
extension, static/js/dex.js), and forms that ask before acting use `data-confirm` (handled in dex.js), not
`onsubmit`. So `script-src 'self'` holds, and an injected `<script>` or `onerror=` in rendered data (a step's
output, a log line) doesn't run. Styles allow 'unsafe-inline': the step timeline positions its bars with
`style=` attributes and htmx adds its indicator styles; a style can't run code.

`settings.DEX_CONTENT_SECURITY_POLICY` replaces the policy when set (e.g. to allow a CDN).
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

BASE_POLICY = [
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
]


def content_security_policy(request: HttpRequest) -> str:
    """The policy for a response to `request`."""
    custom = getattr(settings, "DEX_CONTENT_SECURITY_POLICY", "")
    if custom:
        return custom
    connect = "connect-src 'self'"
    try:
        host = request.get_host()
    except DisallowedHost:
        host = ""
    if host:
        # CSP3 lets 'self' cover ws(s):// of the same host; older browsers need it spelt out.
        connect += f" ws://{host} wss://{host}"
    return "; ".join([*BASE_POLICY, connect])


def _add_headers(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    if "Content-Security-Policy" not in response:
        response["Content-Security-Policy"] = content_security_policy(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@sync_and_async_middleware
def security_headers_middleware(get_response: Callable) -> Callable:
    """Sync and async, so it doesn't push the async views (the SSE stream) onto a thread."""
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            return _add_headers(request, await get_response(request))

    else:

        def middleware(request: HttpRequest) -> HttpResponse:
            return _add_headers(request, get_response(request))

    return middleware
