"""Security hardening: scoped API keys with expiry, API rate limits (real Redis), secret redaction in step
logs and errors (real engine, real Postgres), size caps (request bodies, step outputs, websocket frames) and
the Content-Security-Policy. The who-may-do-what matrix over every URL is tests/unit/test_access_matrix.py;
the SSRF-safe fetch is tests/unit/test_safe_fetch.py.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from dexweb.asgi import application
from runs import redact
from runs.models import ApiKey, ApiKeyScope, LogLine, Run, RunStatus, apikey_all_scopes
from runs.sdk import NonRetriableError, task
from runs.sdk.registry import registry
from runs.testing import run_task

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def api(secret: str | None = None, *, ip: str = "127.0.0.1") -> Client:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return Client(headers=headers, REMOTE_ADDR=ip)


def post(client: Client, url: str, body: Any = None) -> Any:
    return client.post(url, data=json.dumps(body if body is not None else {}), content_type="application/json")


def fresh_ip() -> str:
    # A documentation address of its own per test: the per-IP failure counters of other tests don't leak in.
    return f"198.51.100.{uuid.uuid4().int % 250 + 1}"


@pytest.fixture(autouse=True)
def own_rate_limit_namespace(settings: Any) -> None:
    # Counters live in the shared Redis for a minute: a namespace per test keeps reruns independent.
    settings.DEX_RATE_LIMIT_PREFIX = f"dex-test-{uuid.uuid4().hex[:8]}"


def operator_client() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    user.user_permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    client = Client()
    client.force_login(user)
    return client


# --- scoped keys with expiry -------------------------------------------------------------------------------


def test_a_key_without_the_endpoints_scope_gets_a_403_naming_the_scope() -> None:
    _key, secret = ApiKey.generate(name="reader", scopes=["read"])
    client = api(secret)
    assert client.get("/api/tasks").status_code == 200

    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {}})
    assert response.status_code == 403
    assert response.json() == {"error": {"code": "missing_scope", "message": "this key lacks the 'trigger' scope"}}
    assert not Run.objects.exists()

    response = post(client, "/api/events", {"name": "report.reviewed"})
    assert response.status_code == 403 and "'events' scope" in response.json()["error"]["message"]


def test_a_trigger_only_key_triggers_but_cannot_read() -> None:
    _key, secret = ApiKey.generate(name="ci", scopes=["trigger"])
    client = api(secret)
    response = post(client, "/api/tasks/t-typed/trigger", {"payload": {"name": "Ada", "count": 2}})
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    assert client.get(f"/api/runs/{run_id}").status_code == 403
    assert post(client, f"/api/runs/{run_id}/cancel").status_code == 403


def test_an_expired_key_is_refused_with_a_401_that_says_so() -> None:
    _key, secret = ApiKey.generate(name="old", expires_at=timezone.now() - timedelta(seconds=1))
    response = api(secret).get("/api/tasks")
    assert response.status_code == 401
    body = response.json()["error"]
    assert body["code"] == "key_expired" and "expired" in body["message"]
    assert response["WWW-Authenticate"].startswith("Bearer")

    _key, secret = ApiKey.generate(name="fresh", expires_at=timezone.now() + timedelta(hours=1))
    assert api(secret).get("/api/tasks").status_code == 200


def test_keys_made_without_scopes_keep_full_access() -> None:
    # What the migration's default gives the keys that existed before scopes: every scope.
    key = ApiKey.objects.create(name="legacy", prefix="dex_legacy00", key_hash="0" * 64)
    key.refresh_from_db()
    assert sorted(key.scopes) == sorted(s.value for s in ApiKeyScope) == sorted(apikey_all_scopes())
    assert key.expires_at is None


def test_the_api_keys_page_creates_a_scoped_expiring_key() -> None:
    operator = operator_client()
    page = operator.get("/api-keys/").content.decode()
    assert 'name="scopes"' in page and 'name="expires_in_days"' in page

    response = operator.post("/api-keys/", {"name": "hooks", "scopes": ["events"], "expires_in_days": "7"})
    assert response.status_code == 200
    key = ApiKey.objects.get(name="hooks")
    assert key.scopes == ["events"]
    assert timedelta(days=6, hours=23) < key.expires_at - timezone.now() <= timedelta(days=7)
    secret = response.content.decode().split('id="new-key-secret">', 1)[1].split("<", 1)[0]
    assert api(secret).get("/api/tasks").status_code == 403

    listing = operator.get("/api-keys/").content.decode()
    row = listing.split(f'id="apikey-{key.pk}"', 1)[1].split("</tr>", 1)[0]
    assert "events" in row and key.expires_at.strftime("%Y-%m-%d") in row

    response = operator.post("/api-keys/", {"name": "nothing", "expires_in_days": ""})
    assert response.status_code == 422 and "Pick at least one scope." in response.content.decode()
    assert not ApiKey.objects.filter(name="nothing").exists()


def test_the_apikey_command_takes_scopes_and_an_expiry() -> None:
    out, err = StringIO(), StringIO()
    call_command(
        "apikey", "create", "--name", "ci", "--scope", "trigger,read", "--expires-in", "30d", stdout=out, stderr=err
    )
    secret = out.getvalue().strip()
    key = ApiKey.objects.get(key_hash=ApiKey.hash(secret))
    assert key.scopes == ["trigger", "read"]
    assert timedelta(days=29, hours=23) < key.expires_at - timezone.now() <= timedelta(days=30)
    assert "scopes: trigger, read" in err.getvalue()

    call_command("apikey", "create", "--name", "all", stdout=StringIO(), stderr=StringIO())
    assert sorted(ApiKey.objects.get(name="all").scopes) == sorted(apikey_all_scopes())

    with pytest.raises(CommandError, match="unknown scope 'admin'"):
        call_command("apikey", "create", "--name", "x", "--scope", "admin", stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError, match="--expires-in reads like"):
        call_command("apikey", "create", "--name", "x", "--expires-in", "soon", stdout=StringIO(), stderr=StringIO())

    listing = StringIO()
    call_command("apikey", "list", stdout=listing)
    assert "trigger,read" in listing.getvalue()


# --- rate limits -------------------------------------------------------------------------------------------


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(settings: Any) -> None:
    settings.DEX_API_RATE_LIMIT = "3/60s"
    _key, secret = ApiKey.generate(name="busy")
    client = api(secret)
    assert [client.get("/api/tasks").status_code for _ in range(3)] == [200, 200, 200]

    response = client.get("/api/tasks")
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "throttled"
    assert "3 requests per 60s" in response.json()["error"]["message"]
    assert 1 <= int(response["Retry-After"]) <= 60

    # The limit is per key: another key is served.
    _other, other_secret = ApiKey.generate(name="quiet")
    assert api(other_secret).get("/api/tasks").status_code == 200


def test_failed_authentications_are_limited_per_ip(settings: Any) -> None:
    settings.DEX_API_AUTH_FAILURE_LIMIT = "2/60s"
    _key, secret = ApiKey.generate(name="real")
    ip = fresh_ip()
    assert api("dex_wrong-guess-1", ip=ip).get("/api/tasks").status_code == 401
    assert api("dex_wrong-guess-2", ip=ip).get("/api/tasks").status_code == 401
    response = api("dex_wrong-guess-3", ip=ip).get("/api/tasks")
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1
    assert "failed authentications" in response.json()["error"]["message"]
    # That address is locked out for the window, even with a good key; others aren't.
    assert api(secret, ip=ip).get("/api/tasks").status_code == 429
    assert api(secret, ip=fresh_ip()).get("/api/tasks").status_code == 200


def test_with_redis_unreachable_the_api_keeps_serving(settings: Any, tmp_path: Path) -> None:
    # Triggers must keep being accepted while Redis is down: the limiter fails open.
    settings.DEX_API_RATE_LIMIT = "1/60s"
    settings.REDIS_URL = f"unix://{tmp_path}/no-redis.sock"
    _key, secret = ApiKey.generate(name="during-outage")
    client = api(secret)
    assert [client.get("/api/tasks").status_code for _ in range(3)] == [200, 200, 200]


# --- secret redaction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "calling with key dex_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "openai key sk-proj-abcdefghijklmnopqrstuvwx",
        "Authorization: Bearer abc.def-ghi_jkl123456",
        "aws AKIAIOSFODNN7EXAMPLE ok",
        "connect postgres://dex:hunter2hunter2@db:5432/dex",
        "login with password=correct-horse-battery",
        '{"api_key": "zzzzzzzzzzzzzzzz"}',
        "token: 0123456789abcdef",
    ],
)
def test_redact_hides_secret_shapes(text: str) -> None:
    out = redact.redact(text)
    assert "[redacted]" in out
    for secret in re.findall(r"(?:dex_|sk-|AKIA|hunter2|correct-horse|zzzz|0123456789abcdef|abc\.def)\S*", text):
        assert secret.strip('"}') not in out


def test_redact_hides_values_of_secret_named_variables_and_leaves_prose_alone(monkeypatch: Any) -> None:
    monkeypatch.setenv("BILLING_SERVICE_TOKEN", "plain-looking-value-42")
    redact.forget_cached_values()
    try:
        assert redact.redact("sent plain-looking-value-42 upstream") == "sent [redacted] upstream"
        prose = "searched 3 queries: with statement; context managers (max_tokens=400, password reset flow)"
        assert redact.redact(prose) == prose
    finally:
        monkeypatch.delenv("BILLING_SERVICE_TOKEN")
        redact.forget_cached_values()


ENV_SECRET = "pl41n-v4lue-from-the-environment"
SHAPED_SECRET = "sk-live-0123456789abcdefghijkl"


def _leaky_step() -> None:
    logging.getLogger("some.http.client").info("POST /v1 with Authorization: Bearer %s", SHAPED_SECRET)
    try:
        raise ConnectionError(f"upstream refused key {ENV_SECRET}")
    except ConnectionError:
        logging.getLogger("some.http.client").exception("request failed")
    raise NonRetriableError(f"could not call the API with password={ENV_SECRET} and key {SHAPED_SECRET}")


def _leaky(ctx: Any) -> None:
    ctx.log.info("configured with %s and %s", SHAPED_SECRET, ENV_SECRET)
    ctx.step("call", _leaky_step)


@pytest.fixture
def leaky_task(monkeypatch: Any) -> Any:
    monkeypatch.setenv("UPSTREAM_API_KEY", ENV_SECRET)
    redact.forget_cached_values()
    t = task("t-security-leaky")(_leaky)
    yield t
    registry.unregister(t.id)
    monkeypatch.delenv("UPSTREAM_API_KEY")
    redact.forget_cached_values()


def test_secrets_never_reach_step_logs_errors_or_tracebacks(leaky_task: Any) -> None:
    run = run_task(leaky_task, {})
    assert run.status == RunStatus.FAILED
    step = run.steps.get(key="call")
    stored = json.dumps(
        [list(LogLine.objects.filter(run=run).values_list("message", flat=True)), step.error, run.error]
    )
    assert SHAPED_SECRET not in stored and ENV_SECRET not in stored
    # Redacted, not dropped: the lines and the error are still there to read.
    messages = list(LogLine.objects.filter(run=run).order_by("id").values_list("message", flat=True))
    assert any(m.startswith("configured with [redacted] and [redacted]") for m in messages)
    assert any("Authorization: Bearer [redacted]" in m for m in messages)
    assert any("request failed" in m and "Traceback" in m and "[redacted]" in m for m in messages)
    assert step.error["message"] == "could not call the API with password=[redacted] and key [redacted]"
    assert "NonRetriableError" in step.error["traceback"] and "[redacted]" in step.error["traceback"]


# --- size caps ---------------------------------------------------------------------------------------------


def test_an_api_body_over_the_limit_is_a_413(settings: Any) -> None:
    settings.DEX_MAX_PAYLOAD_BYTES = 1000
    _key, secret = ApiKey.generate(name="big")
    response = post(api(secret), "/api/tasks/t-typed/trigger", {"payload": {"name": "x" * 2000}})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "the limit is 1,000 bytes" in response.json()["error"]["message"]


def _big(ctx: Any) -> str:
    return ctx.step("big", lambda: "x" * 5000)


@pytest.fixture
def big_output_task() -> Any:
    t = task("t-security-big-output")(_big)
    yield t
    registry.unregister(t.id)


def test_a_step_output_over_the_limit_fails_the_step_readably(settings: Any, big_output_task: Any) -> None:
    settings.DEX_MAX_STEP_OUTPUT_BYTES = 1000
    run = run_task(big_output_task, {})
    assert run.status == RunStatus.FAILED
    message = run.steps.get(key="big").error["message"]
    assert "step 'big' returned 5,002 bytes of JSON, over the limit of 1,000 bytes" in message


@pytest.mark.django_db(transaction=True)
def test_a_websocket_frame_over_the_cap_closes_the_socket(settings: Any) -> None:
    settings.DEX_MAX_WS_MESSAGE_BYTES = 1024
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def scenario() -> None:
        headers = [(b"origin", b"http://127.0.0.1"), (b"cookie", cookie.encode())]
        comm = WebsocketCommunicator(application, "/ws/runs/", headers=headers)
        connected, _ = await comm.connect()
        assert connected
        try:
            await comm.receive_from(timeout=10)  # the snapshot
            await comm.send_to(text_data="x" * 100)  # small: ignored, the socket stays open
            await comm.send_to(text_data="x" * 2000)
            while True:
                message = await comm.receive_output(timeout=10)
                if message["type"] == "websocket.close":
                    assert message["code"] == 1009
                    break
        finally:
            await comm.disconnect()

    async_to_sync(scenario)()


# --- Content-Security-Policy -------------------------------------------------------------------------------


def test_every_page_carries_a_csp_and_the_other_security_headers() -> None:
    for response in (Client().get("/login/"), operator_client().get("/"), api().get("/api/tasks")):
        csp = response["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-eval" not in csp.split("script-src", 1)[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert "connect-src 'self' ws://testserver wss://testserver" in csp
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"]


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>", re.IGNORECASE)
INLINE_HANDLER = re.compile(r"\son[a-z]+\s*=\s*[\"']", re.IGNORECASE)


def test_no_template_relies_on_inline_script_the_csp_would_block() -> None:
    templates = [*ROOT.glob("templates/**/*.html"), *ROOT.glob("runs/templates/**/*.html")]
    assert templates
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for path in templates
        for pattern in (INLINE_SCRIPT, INLINE_HANDLER)
        for match in pattern.finditer(path.read_text())
    ]
    assert not offenders, "use a static file / data-confirm instead:\n" + "\n".join(offenders)
