"""The JSON API (DESIGN §4) through Django's test client: auth, trigger, the run list, one run, operator
actions, errors, the OpenAPI schema, and the `apikey` command.

With the plain `django_db` fixture nothing commits, so `transaction.on_commit` never fires: triggering here
creates rows but sends no Celery message.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core import signals
from django.core.handlers.asgi import ASGIHandler
from django.core.management import call_command
from django.db import close_old_connections
from django.test import Client
from django.urls import path, resolve
from django.utils import timezone

from runs.api.views import api
from runs.ids import uuid7_floor
from runs.models import ApiKey, Run, RunStatus, Step, StepKind, StepStatus

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

# The API on its own URLconf: these tests are about the API, and this keeps them independent of the
# dashboard's and the SSE stream's URLs (dexweb/urls.py mounts the same `api` at the same `api/`).
urlpatterns = [path("api/", api.urls)]


@pytest.fixture
def secret() -> str:
    _key, secret = ApiKey.generate(name="tests")
    return secret


@pytest.fixture
def client(secret: str) -> Client:
    return Client(headers={"authorization": f"Bearer {secret}"})


def post(client: Client, url: str, body: Any = None) -> Any:
    data = "" if body is None else json.dumps(body)
    return client.post(url, data=data, content_type="application/json")


def asgi_request(scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    """One request through Django's ASGI handler, on this thread (so on the test's database transaction)."""
    messages: list[dict[str, Any]] = []

    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # the client stays connected; Django stops listening once it answers
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"query_string": b"", "server": ("testserver", 80), "client": ("127.0.0.1", 1), **scope}
    # As Django's test client does: a request must not close the connection holding the test's transaction.
    for signal in (signals.request_started, signals.request_finished):
        signal.disconnect(close_old_connections)
    try:
        async_to_sync(ASGIHandler())(scope, receive, send)
    finally:
        for signal in (signals.request_started, signals.request_finished):
            signal.connect(close_old_connections)
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def make_run(task_id: str = "t-typed", status: str = RunStatus.QUEUED, **fields: Any) -> Run:
    return Run.objects.create(task_id=task_id, status=status, payload=fields.pop("payload", {"name": "x"}), **fields)


# --- auth ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Token abc", "Bearer dex_not-a-real-key"],
    ids=["missing", "empty", "wrong-scheme", "unknown-key"],
)
def test_it_refuses_requests_without_a_valid_key(header: str | None) -> None:
    client = Client(headers={"authorization": header} if header else {})
    response = client.get("/api/runs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_it_refuses_a_revoked_key(client: Client, secret: str) -> None:
    assert client.get("/api/runs").status_code == 200
    ApiKey.objects.update(revoked_at=timezone.now())
    response = client.get("/api/runs")
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_it_records_when_a_key_was_used_at_most_once_a_minute(client: Client) -> None:
    client.get("/api/tasks")
    first = ApiKey.objects.get().last_used_at
    assert first is not None
    client.get("/api/tasks")
    assert ApiKey.objects.get().last_used_at == first
    ApiKey.objects.update(last_used_at=first - timedelta(minutes=2))
    client.get("/api/tasks")
    assert ApiKey.objects.get().last_used_at > first


# --- trigger -------------------------------------------------------------------------------------------------


def test_it_triggers_a_run(client: Client) -> None:
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "ada", "count": 2}, "tags": ["a"]})
    assert response.status_code == 201
    body = response.json()
    run = Run.objects.get(pk=body["id"])
    assert body["status"] == run.status == RunStatus.QUEUED
    assert body["task"] == "t-typed"
    # The stored payload is the validated one, defaults filled in.
    assert body["payload"] == run.payload == {"name": "ada", "count": 2, "ratio": 0.5, "loud": False}
    assert body["tags"] == ["a"]


def test_it_delays_a_run_and_applies_its_priority(client: Client) -> None:
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "ada"}, "delay": 60, "priority": 7})
    assert response.status_code == 201
    run = Run.objects.get(pk=response.json()["id"])
    assert (run.status, run.priority) == (RunStatus.DELAYED, 7)
    assert run.wake_at > timezone.now() + timedelta(seconds=50)


def test_it_returns_the_first_run_for_a_repeated_idempotency_key(client: Client) -> None:
    body = {"payload": {"name": "ada"}, "idempotency_key": "order-42"}
    first = post(client, "/api/tasks/t-typed/trigger", body)
    again = post(client, "/api/tasks/t-typed/trigger", body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert Run.objects.count() == 1


def test_it_answers_400_to_a_body_that_is_not_json(client: Client) -> None:
    response = client.post("/api/tasks/t-typed/trigger", data="{payload: nope", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert not Run.objects.exists()


def test_it_answers_400_to_nan_which_json_does_not_have(client: Client) -> None:
    data = '{"payload": {"name": "x", "ratio": NaN}}'
    response = client.post("/api/tasks/t-typed/trigger", data=data, content_type="application/json")
    assert response.status_code == 400


def test_it_answers_404_for_an_unknown_task(client: Client) -> None:
    response = post(client, "/api/tasks/no-such-task/trigger", {"payload": {}})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "unknown_task"
    assert "no-such-task" in error["message"]


def test_it_names_the_field_of_a_payload_of_the_wrong_type(client: Client) -> None:
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "ada", "count": "many"}})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_payload"
    assert [d["loc"] for d in error["details"]] == [["payload", "count"]]
    assert not Run.objects.exists()


def test_it_names_a_missing_payload_field(client: Client) -> None:
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"count": 1}})
    assert response.status_code == 422
    assert ["payload", "name"] in [d["loc"] for d in response.json()["error"]["details"]]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"payload": {"name": "x"}, "tags": "not-a-list"}, ["tags"]),
        ({"payload": {"name": "x"}, "delay": -1}, ["delay"]),
        ({"payload": {"name": "x"}, "payloda": {}}, ["payloda"]),
        ({"payload": ["not", "an", "object"]}, ["payload"]),
        ({"payload": {"name": "nul \u0000 byte"}}, ["payload"]),
        ({"payload": {"name": "x"}, "tags": ["nul\u0000"]}, ["tags", 0]),
    ],
    ids=["tags-type", "negative-delay", "unknown-field", "payload-type", "nul-in-payload", "nul-in-tag"],
)
def test_it_answers_422_to_a_malformed_request(client: Client, body: dict, loc: list) -> None:
    response = post(client, "/api/tasks/t-typed/trigger", body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert loc in [d["loc"][: len(loc)] for d in error["details"]]
    assert not Run.objects.exists()


def test_it_answers_413_to_an_oversized_body(client: Client, settings: Any) -> None:
    settings.DEX_MAX_PAYLOAD_BYTES = 1000
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "x" * 2000}})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert not Run.objects.exists()


def test_it_answers_413_when_django_refuses_the_body(client: Client, settings: Any) -> None:
    # Past the API's own limit check (the middleware's), Django's upload limit still answers in JSON.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "x" * 2000}})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_it_answers_413_to_an_oversized_body_sent_without_a_length(secret: str, settings: Any) -> None:
    # A chunked upload has no Content-Length for the middleware to check, so the API measures the body. Only
    # ASGI (daphne) passes such a body on, hence the hand-made ASGI request.
    settings.DEX_MAX_PAYLOAD_BYTES = 1000
    body = json.dumps({"payload": {"name": "x" * 2000}}).encode()
    headers = [(b"authorization", f"Bearer {secret}".encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/api/tasks/t-typed/trigger", "headers": headers}
    status, response = asgi_request(scope, body)
    assert status == 413
    assert json.loads(response)["error"]["code"] == "payload_too_large"


# --- tasks ---------------------------------------------------------------------------------------------------


def test_it_lists_the_registered_tasks_with_payload_schemas_and_options(client: Client) -> None:
    response = client.get("/api/tasks")
    assert response.status_code == 200
    tasks = {t["id"]: t for t in response.json()}
    typed = tasks["t-typed"]
    assert typed["payload_schema"]["required"] == ["name"]
    assert typed["payload_schema"]["properties"]["count"]["type"] == "integer"
    assert tasks["t-flaky"]["retry"]["attempts"] == 5
    assert tasks["t-slow-step"]["timeout"] == 0.5
    assert tasks["t-async"]["is_async"] is True


def test_it_shows_one_task_and_404_for_an_unknown_one(client: Client) -> None:
    assert client.get("/api/tasks/t-typed").json()["id"] == "t-typed"
    assert client.get("/api/tasks/nope").status_code == 404


# --- the run list --------------------------------------------------------------------------------------------


def test_it_pages_through_runs_newest_first_with_a_cursor(client: Client) -> None:
    ids = [str(make_run().id) for _ in range(5)]
    seen: list[str] = []
    url = "/api/runs?limit=2"
    pages = 0
    while url:
        body = client.get(url).json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        url = f"/api/runs?limit=2&cursor={body['next_cursor']}" if body["next_cursor"] else ""
    # Newest first is id order (UUIDv7); two runs made in the same millisecond may come either way round.
    assert seen == sorted(ids, reverse=True)
    assert pages == 3


def test_it_does_not_repeat_runs_on_the_next_page_when_new_runs_arrive(client: Client) -> None:
    old = [str(make_run().id) for _ in range(3)]
    first = client.get("/api/runs?limit=2").json()
    make_run()
    second = client.get(f"/api/runs?limit=2&cursor={first['next_cursor']}").json()
    assert [i["id"] for i in first["items"] + second["items"]] == sorted(old, reverse=True)
    assert second["next_cursor"] is None


def test_it_filters_runs_by_status_task_tag_and_creation_time(client: Client) -> None:
    # Made two days ago: its uuid7 id carries that instant too (time filters also bound the id, which is indexed).
    two_days_ago = timezone.now() - timedelta(days=2)
    failed = make_run(status=RunStatus.FAILED, tags=["nightly"], id=uuid7_floor(two_days_ago))
    completed = make_run(status=RunStatus.COMPLETED)
    other_task = make_run(task_id="t-flaky", status=RunStatus.FAILED, payload={"ledger": "/tmp/x"})
    Run.objects.filter(pk=failed.pk).update(created_at=two_days_ago)

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/runs?{query}")
        assert response.status_code == 200, response.content
        return [item["id"] for item in response.json()["items"]]

    def newest_first(*runs: Run) -> list[str]:
        return sorted((str(r.id) for r in runs), reverse=True)

    assert ids("status=failed") == newest_first(other_task, failed)
    assert ids("status=failed&status=completed") == newest_first(other_task, completed, failed)
    assert ids("task=t-typed&status=failed") == [str(failed.id)]
    assert ids("tag=nightly") == [str(failed.id)]
    yesterday = (timezone.now() - timedelta(days=1)).isoformat()
    assert ids(f"created_before={yesterday.replace('+', '%2B')}") == [str(failed.id)]
    assert str(failed.id) not in ids(f"created_after={yesterday.replace('+', '%2B')}")


def test_it_leaves_payloads_out_of_the_list(client: Client) -> None:
    make_run(payload={"name": "secret-ish"})
    (item,) = client.get("/api/runs").json()["items"]
    assert "payload" not in item and "output" not in item
    assert item["task"] == "t-typed"


@pytest.mark.parametrize(
    ("query", "loc"),
    [("limit=201", ["query", "limit"]), ("cursor=garbage", ["query", "cursor"]), ("status=bogus", ["query"])],
)
def test_it_answers_422_to_bad_list_parameters(client: Client, query: str, loc: list) -> None:
    response = client.get(f"/api/runs?{query}")
    assert response.status_code == 422
    assert loc in [d["loc"][: len(loc)] for d in response.json()["error"]["details"]]


# --- one run -------------------------------------------------------------------------------------------------


def test_it_shows_a_run_with_its_steps(client: Client) -> None:
    now = timezone.now()
    run = make_run(status=RunStatus.COMPLETED, output="ADAADA", started_at=now, finished_at=now)
    Step.objects.create(run=run, seq=0, key="plan", status=StepStatus.COMPLETED, output=["q1"], started_at=now)
    Step.objects.create(
        run=run,
        seq=1,
        key="summarize",
        kind=StepKind.AI,
        status=StepStatus.FAILED,
        attempts=3,
        error={"type": "ConnectionError", "message": "boom"},
        meta={"usage": {"input_tokens": 12, "output_tokens": 3}},
    )
    response = client.get(f"/api/runs/{run.id}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["status"], body["output"]) == (str(run.id), "completed", "ADAADA")
    assert body["waitpoints"] == []
    plan, summarize = body["steps"]
    assert (plan["key"], plan["kind"], plan["output"], plan["usage"]) == ("plan", "step", ["q1"], None)
    assert (summarize["status"], summarize["attempts"], summarize["kind"]) == ("failed", 3, "ai")
    assert summarize["error"]["message"] == "boom"
    assert summarize["usage"] == {"input_tokens": 12, "output_tokens": 3}


@pytest.mark.parametrize("run_id", ["0190b5a0-0000-7000-8000-000000000000", "not-a-uuid"])
def test_it_answers_404_for_an_unknown_or_malformed_run_id(client: Client, run_id: str) -> None:
    for response in (client.get(f"/api/runs/{run_id}"), post(client, f"/api/runs/{run_id}/cancel")):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


# --- operator actions ----------------------------------------------------------------------------------------


def test_it_cancels_a_queued_run(client: Client) -> None:
    run = make_run()
    response = post(client, f"/api/runs/{run.id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELED


def test_it_refuses_to_cancel_a_completed_run_with_409(client: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    response = post(client, f"/api/runs/{run.id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "run_state"
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED


def test_it_retries_a_failed_run(client: Client) -> None:
    run = make_run(status=RunStatus.FAILED, error={"type": "ValueError", "message": "broken"})
    response = post(client, f"/api/runs/{run.id}/retry")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["error"]) == ("queued", None)


def test_it_refuses_to_retry_a_completed_run_with_409(client: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    assert post(client, f"/api/runs/{run.id}/retry").status_code == 409


def test_it_replays_a_run_with_its_payload_or_an_edited_one(client: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED, payload={"name": "ada", "count": 1}, tags=["x"])
    same = post(client, f"/api/runs/{run.id}/replay")
    edited = post(client, f"/api/runs/{run.id}/replay", {"payload": {"name": "bob"}, "tags": ["y"]})
    assert (same.status_code, edited.status_code) == (201, 201)
    assert same.json()["payload"]["name"] == "ada" and same.json()["tags"] == ["x"]
    assert edited.json()["payload"]["name"] == "bob" and edited.json()["tags"] == ["y"]
    assert same.json()["replay_of"] == edited.json()["replay_of"] == str(run.id)


def test_it_answers_422_to_a_replay_with_a_bad_payload(client: Client) -> None:
    run = make_run(status=RunStatus.COMPLETED)
    response = post(client, f"/api/runs/{run.id}/replay", {"payload": {"name": "x", "count": "lots"}})
    assert response.status_code == 422
    assert [d["loc"] for d in response.json()["error"]["details"]] == [["payload", "count"]]


# --- schema and docs -----------------------------------------------------------------------------------------


def test_it_serves_the_openapi_schema_and_docs_without_a_key() -> None:
    anonymous = Client()
    response = anonymous.get("/api/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/tasks", "/api/tasks/{task_id}/trigger", "/api/runs", "/api/runs/{run_id}"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] == {"type": "http", "scheme": "bearer"}
    assert schema["components"]["schemas"]["TriggerIn"]["examples"]
    assert anonymous.get("/api/docs").status_code == 200


def test_it_is_what_the_project_serves_under_api() -> None:
    # The SSE stream is routed ahead of the API; everything else under /api/ is this API.
    assert resolve("/api/runs", urlconf="dexweb.urls").namespace == "api"
    assert resolve(f"/api/runs/{Run().id}/stream", urlconf="dexweb.urls").url_name == "api-run-stream"


# --- the apikey command --------------------------------------------------------------------------------------


def test_it_creates_a_key_with_the_command_that_then_authenticates() -> None:
    out, err = StringIO(), StringIO()
    call_command("apikey", "create", "--name", "ci", stdout=out, stderr=err)
    secret = out.getvalue().strip()
    assert secret.startswith("dex_")
    assert "shown only now" in err.getvalue()
    key = ApiKey.objects.get(name="ci")
    assert key.key_hash != secret and secret not in key.key_hash
    assert Client(headers={"authorization": f"Bearer {secret}"}).get("/api/runs").status_code == 200


def test_it_lists_and_revokes_keys_with_the_command() -> None:
    out = StringIO()
    call_command("apikey", "create", "--name", "ci", stdout=out)
    secret = out.getvalue().strip()
    key = ApiKey.objects.get()
    listing = StringIO()
    call_command("apikey", "list", stdout=listing)
    assert key.prefix in listing.getvalue() and "ci" in listing.getvalue()
    call_command("apikey", "revoke", key.prefix, stdout=StringIO())
    assert Client(headers={"authorization": f"Bearer {secret}"}).get("/api/runs").status_code == 401
