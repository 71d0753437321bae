"""Who is calling the HTTP API, and may they: `Authorization: Bearer <api key>`, the key's expiry and scopes,
and the rate limits (runs.api.ratelimit). Shared by the django-ninja endpoints (runs.api.views) and the SSE stream
(runs.api.sse), so both answer a bad key, a missing scope or a flood the same way.

Failures are ApiAuthError(status, code, message): 401 missing / malformed / unknown / revoked / expired key,
403 a key without the endpoint's scope, 429 over a rate limit (with `retry_after`).
"""

from __future__ import annotations

from django.http import HttpRequest

from runs import services
from runs.api import ratelimit
from runs.models import ApiKey, ApiKeyScope


class ApiAuthError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def bearer_token(request: HttpRequest) -> str:
    """The token of `Authorization: Bearer <token>`, or ApiAuthError 401 saying what is wrong with it."""
    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiAuthError(401, "unauthorized", "missing API key: send the header `Authorization: Bearer <key>`")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiAuthError(401, "unauthorized", "the Authorization header must read `Bearer <key>`")
    return token.strip()


def client_ip(request: HttpRequest) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is whatever the client wants it to be unless a proxy we trust set it.
    return request.META.get("REMOTE_ADDR") or "unknown"


def authenticate(request: HttpRequest, *, scope: str | None) -> ApiKey:
    """The request's API key, checked: live, not expired, within its rate limit and holding `scope` (None:
    every scope, for an endpoint that declares none — fail closed). Raises ApiAuthError."""
    token = bearer_token(request)
    ip = client_ip(request)
    key_limit, failure_limit = ratelimit.api_limit(), ratelimit.auth_failure_limit()
    buckets = []
    if key_limit is not None:
        # Bucketed by the key's hash, so the limit is checked before (and without) a database lookup.
        buckets.append(ratelimit.Bucket(f"key:{ApiKey.hash(token)[:32]}", key_limit))
    if failure_limit is not None:
        buckets.append(ratelimit.Bucket(f"authfail:{ip}", failure_limit, count=False))
    windows = dict(zip((b.name.split(":")[0] for b in buckets), ratelimit.hit(*buckets), strict=True))
    failures = windows.get("authfail")
    if failure_limit is not None and failures is not None and failures.hits >= failure_limit.count:
        raise ApiAuthError(
            429,
            "throttled",
            f"too many failed authentications from {ip}: at most {failure_limit.count} per "
            f"{failure_limit.period}s; retry in {failures.retry_after}s",
            retry_after=failures.retry_after,
        )
    try:
        key = services.apikey_authenticate(secret=token)
    except services.ApiKeyExpired as exc:
        raise ApiAuthError(401, "key_expired", str(exc)) from None
    if key is None:
        if failure_limit is not None:
            ratelimit.hit(ratelimit.Bucket(f"authfail:{ip}", failure_limit))
        raise ApiAuthError(401, "unauthorized", "invalid or revoked API key")
    used = windows.get("key")
    if key_limit is not None and used is not None and used.hits > key_limit.count:
        raise ApiAuthError(
            429,
            "throttled",
            f"this API key is over its rate limit of {key_limit.count} requests per {key_limit.period}s; "
            f"retry in {used.retry_after}s",
            retry_after=used.retry_after,
        )
    needed = [scope] if scope is not None else [s.value for s in ApiKeyScope]
    missing = [s for s in needed if not key.has_scope(s)]
    if missing:
        names = ", ".join(f"'{s}'" for s in missing)
        raise ApiAuthError(403, "missing_scope", f"this key lacks the {names} scope{'s' if len(missing) > 1 else ''}")
    return key
