"""The API under hostile input (issue 12): every route × every method answers JSON with the right status and
never a 500; CSRF never applies to it; malformed bodies, wrong content types, NULs, out-of-range dates and a
reused idempotency key each get a clear JSON error. Through the project's own URLconf (dexweb/urls.py), with
its middleware, as a client would meet it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from runs.api.views import api
from runs.models import ApiKey, Run, Waitpoint

pytestmark = pytest.mark.django_db

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# Routes under /api/ that are not django-ninja operations (their methods are not in the OpenAPI schema).
OTHER_ROUTES = {
    "api/runs/<uuid:run_id>/stream": {"GET"},
    "api/openapi.json": None,  # served by django-ninja for any method: None = not checked for 405
    "api/docs": None,
    "api/": None,
}
STREAMS = {"api/runs/<uuid:run_id>/stream"}
# Successful answers that are not JSON, by design.
NOT_JSON_ON_SUCCESS = {"api/docs": "text/html", "api/runs/<uuid:run_id>/stream": "text/event-stream"}


def api_routes() -> list[tuple[str, Any]]:
    """Every route of the URLconf under api/, as (route, pattern)."""

    def walk(patterns: list[Any], prefix: str) -> Any:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                yield prefix + str(pattern.pattern), pattern

    return [(route, p) for route, p in walk(get_resolver().url_patterns, "") if route.startswith("api/")]


def allowed_methods(route: str) -> set[str] | None:
    if route in OTHER_ROUTES:
        return OTHER_ROUTES[route]
    paths = api.get_openapi_schema()["paths"]
    openapi_path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
    assert openapi_path in paths, f"{route} is neither an API operation nor classified in OTHER_ROUTES"
    return {method.upper() for method in paths[openapi_path]}


@pytest.fixture
def secret() -> str:
    _key, secret = ApiKey.generate(name="walker")
    return secret


def concrete(route: str, run: Run) -> str:
    values = {"run_id": str(run.pk), "task_id": "t-typed", "token": "no-such-token"}
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: values[m[1]], route)


def is_json(response: Any) -> bool:
    return response["Content-Type"].split(";")[0] == "application/json"


def call(client: Client, method: str, url: str) -> Any:
    return client.generic(method, url, data=b"{}", content_type="application/json")


def test_it_answers_every_route_and_method_with_json_and_never_a_500(secret: str) -> None:
    run = Run.objects.create(task_id="t-typed", payload={"name": "x"})
    # enforce_csrf_checks: a browser-less client with a key must never meet Django's CSRF page.
    keyed = Client(headers={"authorization": f"Bearer {secret}"}, enforce_csrf_checks=True)
    anonymous = Client(enforce_csrf_checks=True)
    routes = api_routes()
    assert len(routes) >= 12  # the walk found the API (not an empty URLconf)
    seen = []
    for route, _pattern in routes:
        allowed = allowed_methods(route)
        url = concrete(route, run)
        for method in METHODS:
            if route in STREAMS and method == "GET":
                continue  # an open event stream: tests/unit/test_consumers.py reads it (and its 401s)
            response = call(keyed, method, url)
            where = f"{method} {url} -> {response.status_code}"
            seen.append(where)
            assert response.status_code < 500, where
            documented = NOT_JSON_ON_SUCCESS.get(route)
            if not (documented and response.status_code == 200):
                assert is_json(response), f"{where}: {response['Content-Type']}"
            if method == "HEAD" or not is_json(response):
                continue
            body = json.loads(response.content) if response.content else None
            if response.status_code >= 400:
                assert set(body["error"]) >= {"code", "message"}, where
            if allowed is None:
                continue
            if method in allowed:
                assert response.status_code != 405, where
                unauthenticated = call(anonymous, method, url)
                assert (unauthenticated.status_code, is_json(unauthenticated)) == (401, True), where
            else:
                assert response.status_code == 405, where
                assert body["error"]["code"] == "method_not_allowed"
                assert set(response["Allow"].replace(" ", "").split(",")) == allowed, where
    assert len(seen) == len(routes) * len(METHODS) - len(STREAMS)


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_an_unknown_api_path_is_a_json_404_for_every_method_even_without_csrf(secret: str, method: str) -> None:
    client = Client(headers={"authorization": f"Bearer {secret}"}, enforce_csrf_checks=True)
    response = call(client, method, "/api/no/such/thing")
    assert (response.status_code, is_json(response)) == (404, True)
    assert response.json()["error"]["code"] == "not_found"


@pytest.fixture
def client(secret: str) -> Client:
    return Client(headers={"authorization": f"Bearer {secret}"}, enforce_csrf_checks=True)


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("multipart/form-data; boundary=nope", b"--x\r\nContent-Disposition: broken\r\n\r\n"),
        ("multipart/form-data", b'{"name": "a"}'),  # no boundary at all
        ("application/x-www-form-urlencoded", b"name=a"),  # curl -d without a Content-Type
        ("text/plain", b'{"name": "a"}'),
    ],
)
def test_a_body_that_is_not_json_is_a_400_naming_the_content_type(
    client: Client, content_type: str, body: bytes
) -> None:
    response = client.generic("POST", "/api/events", data=body, content_type=content_type)
    assert (response.status_code, is_json(response)) == (400, True)
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_type"
    assert content_type.split(";")[0] in error["message"] and "application/json" in error["message"]


def test_a_json_body_with_a_json_content_type_still_works(client: Client) -> None:
    response = client.post("/api/events", '{"name": "a"}', content_type="application/vnd.api+json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    "url",
    [
        "/api/waitpoints/%00/complete",
        "/api/tasks/t%00typed/trigger",
        "/api/tasks/%00",
        "/api/runs/%00/cancel",
    ],
)
def test_a_nul_in_the_path_is_a_400_not_a_database_error(client: Client, url: str) -> None:
    response = client.post(url, "{}", content_type="application/json")
    assert (response.status_code, is_json(response)) == (400, True)
    assert response.json()["error"]["code"] == "invalid_path"
    assert "NUL" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"name": "order\u0000paid"}, ["name"]),
        ({"name": "ok", "data": {"k": ["x\u0000"]}}, ["data", "k", 0]),
        ({"name": "ok", "id": "\u0000"}, ["id"]),
    ],
)
def test_a_nul_in_an_event_is_a_422_naming_the_field(client: Client, body: dict, loc: list) -> None:
    response = client.post("/api/events", json.dumps(body), content_type="application/json")
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert (detail["loc"], detail["type"]) == (loc, "unstorable_text")


def test_a_nul_in_a_waitpoint_completion_is_a_422(client: Client) -> None:
    run = Run.objects.create(task_id="t-typed", payload={"name": "x"}, status="waiting")
    waitpoint = Waitpoint.objects.create(run=run, step_key="wait", kind="token", token=uuid.uuid4().hex)
    response = client.post(
        f"/api/waitpoints/{waitpoint.token}/complete", '{"data": "a\\u0000"}', content_type="application/json"
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["data"]


@pytest.mark.parametrize(
    "query",
    [
        "created_after=0001-01-01T00:00:00Z",
        "created_before=9999-12-31T23:59:59Z",
        "created_after=0001-01-01T00:00:00Z&created_before=9999-12-31T23:59:59.999999Z",
    ],
)
def test_the_first_and_last_representable_dates_filter_without_error(client: Client, query: str) -> None:
    run = Run.objects.create(task_id="t-typed", payload={"name": "x"})
    response = client.get(f"/api/runs?{query}")
    assert response.status_code == 200, response.content
    assert [item["id"] for item in response.json()["items"]] == [str(run.pk)]


@pytest.mark.parametrize(
    "query, field",
    [
        ("created_after=0001-01-01T00:00:00%2B05:00", "created_after"),
        ("created_before=9999-12-31T23:00:00-05:00", "created_before"),
        ("created_after=0000-01-01T00:00:00Z", "created_after"),
        ("created_before=2025-13-45T99:00:00Z", "created_before"),
    ],
)
def test_a_date_outside_what_dex_can_represent_is_a_422_naming_the_field(
    client: Client, query: str, field: str
) -> None:
    response = client.get(f"/api/runs?{query}")
    assert response.status_code == 422, response.content
    assert response.json()["error"]["details"][0]["loc"] == ["query", field]


def test_the_dashboard_filters_by_the_first_and_last_dates_without_error(viewer: Client) -> None:
    for query in ("created_after=0001-01-01", "created_before=9999-12-31"):
        response = viewer.get(f"/?{query}")
        assert response.status_code == 200


# --- idempotency (DESIGN §3: Stripe's rule) ----------------------------------------------------------------


def trigger(client: Client, body: dict) -> Any:
    return client.post("/api/tasks/t-typed/trigger", json.dumps(body), content_type="application/json")


def test_the_same_key_and_payload_return_the_first_run(client: Client) -> None:
    body = {"payload": {"name": "ada"}, "idempotency_key": "order-7"}
    first, again = trigger(client, body), trigger(client, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_the_same_key_with_another_payload_is_a_409_naming_the_first_run(client: Client) -> None:
    first = trigger(client, {"payload": {"name": "ada"}, "idempotency_key": "order-8"})
    conflict = trigger(client, {"payload": {"name": "grace"}, "idempotency_key": "order-8"})
    assert conflict.status_code == 409
    error = conflict.json()["error"]
    assert error["code"] == "idempotency_conflict"
    assert first.json()["id"] in error["message"] and "order-8" in error["message"]
    assert conflict["Location"] == f"/api/runs/{first.json()['id']}"
    assert Run.objects.count() == 1


def test_the_cli_refuses_the_same_key_with_another_payload() -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    call_command("dex", "trigger", "t-typed", "--payload", '{"name": "a"}', "--idempotency-key", "k", stdout=StringIO())
    with pytest.raises(CommandError, match="idempotency key 'k' was already used .* with a different payload: run "):
        call_command(
            "dex", "trigger", "t-typed", "--payload", '{"name": "b"}', "--idempotency-key", "k", stdout=StringIO()
        )


# --- oversize bodies --------------------------------------------------------------------------------------


def test_an_oversized_api_body_is_a_json_413(client: Client, settings: Any) -> None:
    settings.DEX_MAX_PAYLOAD_BYTES = 100
    response = client.post("/api/events", json.dumps({"name": "x", "data": "y" * 500}), content_type="application/json")
    assert (response.status_code, response.json()["error"]["code"]) == (413, "payload_too_large")


def test_an_oversized_dashboard_form_is_a_413_page_that_says_so(operator: Client, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = operator.post("/events/", {"name": "x", "data": "y" * 5000})
    assert response.status_code == 413
    assert "The form is too large to accept" in response.content.decode()
    assert "the limit is 1,000 bytes" in response.content.decode()
