"""Who may do what, over every URL Dex serves: each route of dexweb/urls.py (walked from the resolver) and each
websocket route is classified below, and a route nobody classified fails the suite — a new view can't slip in
without saying who may use it.

- dashboard pages: anonymous → the login page; a viewer reads (GET 200) but every POST is refused (403, or
  405 where the page takes no POST); an operator's POST is served.
- dashboard actions (POST only): anonymous → login; viewer → 403; operator → served.
- API endpoints: no key → 401 JSON; a session (viewer or operator) is not a key → 401; a key holding every
  scope but the endpoint's → 403 naming it; a key holding only that scope → served.
- websockets: anonymous refused; viewer and operator connect.
- metrics: no credentials → 401, a non-staff user → 403, staff → 200. Admin: non-staff → the admin login.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import AsyncClient, Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from dexweb.asgi import application
from runs.engine import waitpoint_create
from runs.models import (
    AlertChannel,
    AlertDestination,
    ApiKey,
    ApiKeyScope,
    Run,
    RunStatus,
    Schedule,
    Step,
    StepStatus,
    WaitpointKind,
)
from runs.web.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db

# --- the classification: every route, and who may use it ---------------------------------------------------

# GET for anyone logged in, no POST.
READ_PAGES = {
    "",
    "audit/",
    "runs/<uuid:run_id>/",
    "runs/<uuid:run_id>/payload.json",
    "runs/<uuid:run_id>/step/",
    "runs/<uuid:run_id>/trace/",
    "runs/<uuid:run_id>/children/",
    "runs/<uuid:run_id>/output.json",
    "runs/<uuid:run_id>/steps/<int:step_pk>/output.json",
    "tasks/",
    "approvals/",
    "usage/",
}
# GET for anyone logged in; POST (the page's form) for operators.
FORM_PAGES = {
    "tasks/<str:task_id>/",
    "events/",
    "schedules/",
    "schedules/<int:schedule_id>/",
    "api-keys/",
    "alerts/",
    "alerts/<int:destination_id>/",
}
# POST only, operators only.
ACTIONS = {
    "runs/bulk/",
    "runs/<uuid:run_id>/cancel/",
    "runs/<uuid:run_id>/retry/",
    "runs/<uuid:run_id>/replay/",
    "runs/<uuid:run_id>/steps/<int:step_pk>/fork/",
    "runs/<uuid:run_id>/waitpoints/<int:waitpoint_id>/complete/",
    "approvals/<int:waitpoint_id>/",
    "schedules/<int:schedule_id>/delete/",
    "alerts/<int:destination_id>/delete/",
    "alerts/<int:destination_id>/test/",
    "api-keys/<int:key_id>/revoke/",
}
# route → (method, the scope an API key needs).
API = {
    "api/tasks": ("GET", ApiKeyScope.READ),
    "api/tasks/<task_id>": ("GET", ApiKeyScope.READ),
    "api/tasks/<task_id>/trigger": ("POST", ApiKeyScope.TRIGGER),
    "api/runs": ("GET", ApiKeyScope.READ),
    "api/runs/<run_id>": ("GET", ApiKeyScope.READ),
    "api/runs/<uuid:run_id>/stream": ("GET", ApiKeyScope.READ),
    "api/runs/<run_id>/cancel": ("POST", ApiKeyScope.OPERATE),
    "api/runs/<run_id>/retry": ("POST", ApiKeyScope.OPERATE),
    "api/runs/<run_id>/replay": ("POST", ApiKeyScope.OPERATE),
    "api/events": ("POST", ApiKeyScope.EVENTS),
    "api/waitpoints/<token>/complete": ("POST", ApiKeyScope.EVENTS),
}
# Open to everyone, on purpose: signing in and out, the API's schema and docs, JSON 404s under /api/.
PUBLIC = {"login/", "logout/", "api/openapi.json", "api/docs", "api/", "^api/"}
# Its own bearer token (DEX_METRICS_TOKEN) or a staff session.
METRICS = {"metrics"}
# Everything under admin/ is Django's admin: staff only, behind its own login.
ADMIN_PREFIX = "admin/"
WEBSOCKETS = {"ws/runs/", "ws/runs/<uuid:run_id>/"}


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern)


def http_routes() -> list[str]:
    return [route for route in _walk(get_resolver().url_patterns) if not route.startswith(ADMIN_PREFIX)]


CLASSIFIED = READ_PAGES | FORM_PAGES | ACTIONS | set(API) | PUBLIC | METRICS


def test_every_route_is_classified() -> None:
    routes = set(http_routes())
    unclassified = sorted(routes - CLASSIFIED)
    assert not unclassified, f"classify these routes in {__name__} (who may use them?): {unclassified}"
    stale = sorted(CLASSIFIED - routes)
    assert not stale, f"these classified routes no longer exist: {stale}"
    sockets = {str(p.pattern) for p in websocket_urlpatterns}
    assert sockets == WEBSOCKETS, f"classify the websocket routes: {sorted(sockets ^ WEBSOCKETS)}"
    assert any(route.startswith(ADMIN_PREFIX) for route in _walk(get_resolver().url_patterns))


# --- the world the requests act on --------------------------------------------------------------------------


@dataclass
class World:
    run: Run
    step: Step
    waitpoint_id: int
    token: str
    schedule_id: int
    key_id: int
    destination_id: int

    def url(self, route: str) -> str:
        values = {
            "<uuid:run_id>": str(self.run.pk),
            "<run_id>": str(self.run.pk),
            "<int:step_pk>": str(self.step.pk),
            "<int:waitpoint_id>": str(self.waitpoint_id),
            "<token>": self.token,
            "<str:task_id>": "t-typed",
            "<task_id>": "t-typed",
            "<int:schedule_id>": str(self.schedule_id),
            "<int:key_id>": str(self.key_id),
            "<int:destination_id>": str(self.destination_id),
        }
        for placeholder, value in values.items():
            route = route.replace(placeholder, value)
        assert "<" not in route, f"no value for a parameter of {route}"
        return "/" + route


@pytest.fixture
def world() -> World:
    now = timezone.now()
    run = Run.objects.create(
        task_id="t-typed",
        status=RunStatus.WAITING,
        payload={"name": "Ada", "count": 1},
        output={"ok": True},
    )
    first = Step.objects.create(
        run=run, key="first", seq=0, status=StepStatus.COMPLETED, output=1, started_at=now, finished_at=now
    )
    Step.objects.create(run=run, key="second", seq=1, status=StepStatus.COMPLETED, output=2, started_at=now)
    wp = waitpoint_create(
        run_id=run.pk, kind=WaitpointKind.APPROVAL, step_key="approve", timeout_at=None, prompt="Ship it?"
    )
    schedule = Schedule.objects.create(task_id="t-typed", cron="0 0 1 1 *", payload={"name": "Ada", "count": 1})
    key, _secret = ApiKey.generate(name="to-revoke")
    destination = AlertDestination.objects.create(kind=AlertChannel.EMAIL, target="ops@example.com")
    return World(run, first, wp.pk, wp.token, schedule.pk, key.pk, destination.pk)


def _login(username: str, *, operator: bool = False, staff: bool = False) -> Client:
    # No password: force_login needs none, and hashing one costs more than the requests tested here.
    user = get_user_model().objects.create_user(username, is_staff=staff)
    if operator:
        user.user_permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer() -> Client:
    return _login("viewer")


@pytest.fixture
def operator() -> Client:
    return _login("operator", operator=True)


def _to_login(response: Any, login: str = "/login/") -> bool:
    return response.status_code == 302 and response["Location"].startswith(login)


# --- pages and actions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(READ_PAGES | FORM_PAGES))
def test_pages_anonymous_goes_to_login_viewer_reads_operator_writes(
    route: str, world: World, viewer: Client, operator: Client
) -> None:
    url = world.url(route)
    assert _to_login(Client().get(url)), url
    anonymous_post = Client().post(url, {})
    # A read-only page refuses the method before asking who is there (405); the others ask for a login.
    assert anonymous_post.status_code == 405 if route in READ_PAGES else _to_login(anonymous_post), url
    assert viewer.get(url).status_code == 200, url
    refused = viewer.post(url, {})
    if route in FORM_PAGES:
        assert refused.status_code == 403, url
        served = operator.post(url, {})
        assert served.status_code in (200, 302, 422), (url, served.status_code)
    else:
        assert refused.status_code == 405, url


@pytest.mark.parametrize("route", sorted(ACTIONS))
def test_actions_anonymous_goes_to_login_viewer_is_refused_operator_acts(
    route: str, world: World, viewer: Client, operator: Client
) -> None:
    url = world.url(route)
    assert _to_login(Client().post(url, {})), url
    assert viewer.post(url, {}).status_code == 403, url
    assert viewer.get(url).status_code in (403, 405), url
    served = operator.post(url, {})
    # Served: done (200 / 302), or refused for what was sent (400 / 409 / 422) — not for who sent it.
    assert served.status_code in (200, 302, 400, 409, 422), (url, served.status_code)


def test_metrics_need_its_token_or_a_staff_session(settings: Any, viewer: Client) -> None:
    settings.DEX_METRICS_TOKEN = "metrics-token-for-tests"
    assert Client().get("/metrics").status_code == 401
    assert viewer.get("/metrics").status_code == 403
    assert Client(headers={"authorization": "Bearer wrong"}).get("/metrics").status_code == 403
    assert _login("staff", staff=True).get("/metrics").status_code == 200
    assert Client(headers={"authorization": "Bearer metrics-token-for-tests"}).get("/metrics").status_code == 200


def test_the_admin_is_for_staff_only(operator: Client) -> None:
    for client in (Client(), operator):
        for url in ("/admin/", "/admin/runs/run/", f"/admin/runs/run/{uuid.uuid4()}/change/"):
            assert _to_login(client.get(url), "/admin/login/"), url
    assert _login("admin", staff=True).get("/admin/").status_code == 200


# --- the API -------------------------------------------------------------------------------------------------


BODIES = {
    "api/tasks/<task_id>/trigger": {"payload": {"name": "Ada", "count": 1}},
    "api/events": {"name": "matrix.event", "data": {}},
    "api/waitpoints/<token>/complete": {"data": {"approved": True}},
}


STREAM = "api/runs/<uuid:run_id>/stream"


def _check_api(route: str, url: str, call: Any, sessions: list[Client | None]) -> None:
    method, scope = API[route]
    body = BODIES.get(route)
    for session in sessions:  # no key; a dashboard session is not an API key
        response = call(session, method, url, body, None)
        assert response.status_code == 401, (url, response.status_code)
        assert response.json()["error"]["code"] == "unauthorized"

    others = [s.value for s in ApiKeyScope if s != scope]
    response = call(None, method, url, body, _secret(others))
    assert response.status_code == 403, (url, response.status_code)
    assert response.json()["error"] == {"code": "missing_scope", "message": f"this key lacks the '{scope.value}' scope"}

    response = call(None, method, url, body, _secret([scope.value]))
    assert response.status_code not in (401, 403, 429) and response.status_code < 500, (url, response.content)


def _secret(scopes: list[str]) -> str:
    return ApiKey.generate(name="matrix", scopes=scopes)[1]


def _sync_call(session: Client | None, method: str, url: str, body: Any, secret: str | None) -> Any:
    client = session or Client()
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    if method == "GET":
        return client.get(url, headers=headers)
    return client.post(url, data=json.dumps(body or {}), content_type="application/json", headers=headers)


@pytest.mark.parametrize("route", sorted(set(API) - {STREAM}))
def test_api_needs_a_key_with_the_endpoints_scope(route: str, world: World, viewer: Client, operator: Client) -> None:
    _check_api(route, world.url(route), _sync_call, [None, viewer, operator])


@pytest.mark.django_db(transaction=True)
def test_the_event_stream_needs_a_key_with_the_read_scope() -> None:
    # The stream is an async view: called through the async client, as a frontend's EventSource would. An
    # unknown run: past the auth checks it is a 404, without holding a stream open.
    url = f"/api/runs/{uuid.uuid4()}/stream"

    def call(session: Client | None, method: str, url: str, body: Any, secret: str | None) -> Any:
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        cookies = {"sessionid": session.cookies["sessionid"].value} if session else {}

        async def get() -> Any:
            client = AsyncClient()
            for name, value in cookies.items():
                client.cookies[name] = value
            return await client.get(url, headers=headers)

        return async_to_sync(get)()

    _check_api(STREAM, url, call, [None, _login("sse-viewer"), _login("sse-operator", operator=True)])


# --- websockets ----------------------------------------------------------------------------------------------


def _cookie(client: Client) -> str:
    return f"sessionid={client.cookies['sessionid'].value}"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("route", sorted(WEBSOCKETS))
def test_websockets_refuse_anonymous_and_serve_viewers_and_operators(route: str) -> None:
    run = Run.objects.create(task_id="t-typed", status=RunStatus.QUEUED, payload={"name": "Ada", "count": 1})
    path = "/" + route.replace("<uuid:run_id>", str(run.pk))
    cookies = {
        "anonymous": None,
        "viewer": _cookie(_login("ws-viewer")),
        "operator": _cookie(_login("ws-operator", operator=True)),
    }

    async def connects(cookie: str | None) -> bool:
        headers = [(b"origin", b"http://127.0.0.1")]
        if cookie:
            headers.append((b"cookie", cookie.encode()))
        comm = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await comm.connect()
        await comm.disconnect()
        return connected

    outcome = {who: async_to_sync(connects)(cookie) for who, cookie in cookies.items()}
    assert outcome == {"anonymous": False, "viewer": True, "operator": True}
