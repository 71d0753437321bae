"""The dashboard's tasks, events, approvals, schedules and API keys pages: what viewers read, what operators
do through the forms (without JS), and that bad input is a form error, never a 500."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal

import pydantic
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from runs.engine import waitpoint_create
from runs.models import ApiKey, AuditEntry, Event, Run, RunStatus, Schedule, ScheduleSource, Waitpoint, WaitpointKind
from runs.sdk import task
from runs.sdk.registry import registry

pytestmark = pytest.mark.django_db

PAGES = ["/tasks/", "/tasks/t-typed/", "/events/", "/approvals/", "/schedules/", "/api-keys/"]


@pytest.fixture
def viewer() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user("viewer", password="pw-viewer-123"))
    return client


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    user.user_permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    client = Client()
    client.force_login(user)
    return client


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(pydantic.BaseModel):
    city: str
    zip: str = ""


class Booking(pydantic.BaseModel):
    seats: int = pydantic.Field(ge=1)
    kind: Literal["hotel", "car"] = "hotel"
    color: Color = Color.RED
    guests: list[str] = []
    address: Address
    note: str | None = None


def _book(ctx: Any, booking: Booking) -> dict:
    return booking.model_dump(mode="json")


@pytest.fixture
def booking_task() -> Iterator[Any]:
    t = task("t-pages-booking")(_book)
    yield t
    registry.unregister(t.id)


# --- every page -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_it_renders_each_page_for_a_viewer(viewer: Client, path: str) -> None:
    response = viewer.get(path)
    assert response.status_code == 200
    page = response.content.decode()
    assert 'aria-current="page"' in page
    for link in ("/tasks/", "/events/", "/approvals/", "/schedules/", "/api-keys/", "/audit/"):
        assert f'href="{link}"' in page
    assert 'method="post"' not in page.split("</header>", 1)[1]  # viewers get no forms to act with


@pytest.mark.parametrize("path", PAGES)
def test_it_sends_anonymous_visitors_to_the_login_page(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302 and response["Location"] == f"/login/?next={path}"


@pytest.mark.parametrize(
    "path, data",
    [
        ("/tasks/t-typed/", {"payload-name": "x"}),
        ("/events/", {"name": "report.reviewed", "data": "{}"}),
        ("/schedules/", {"task_id": "t-typed", "cron": "* * * * *", "timezone": "UTC", "payload": '{"name": "x"}'}),
        ("/api-keys/", {"name": "ci"}),
        ("/approvals/1/", {"decision": "reject"}),
        ("/schedules/1/delete/", {}),
        ("/api-keys/1/revoke/", {}),
    ],
)
def test_it_refuses_viewer_posts(viewer: Client, client: Client, path: str, data: dict) -> None:
    assert viewer.post(path, data).status_code == 403
    assert client.post(path, data).status_code == 302  # anonymous: to the login page
    assert not Run.objects.exists() and not Event.objects.exists() and not ApiKey.objects.exists()
    assert not Schedule.objects.filter(source=ScheduleSource.USER).exists()


def test_the_navigation_highlights_the_current_page(viewer: Client) -> None:
    page = viewer.get("/events/").content.decode()
    assert '<a href="/events/" aria-current="page">Events</a>' in page
    assert '<a href="/tasks/" aria-current="page">' not in page
    assert 'href="/admin/"' not in page  # staff only


# --- tasks ------------------------------------------------------------------------------------------------


def test_the_task_list_shows_24h_stats(viewer: Client) -> None:
    now = timezone.now()
    for seconds in (1, 2, 3):
        Run.objects.create(
            task_id="t-typed",
            status=RunStatus.COMPLETED,
            started_at=now - timedelta(seconds=seconds),
            finished_at=now,
        )
    Run.objects.create(task_id="t-typed", status=RunStatus.FAILED, started_at=now, finished_at=now)
    Run.objects.create(task_id="t-typed", status=RunStatus.RUNNING)

    page = viewer.get("/tasks/").content.decode()
    row = page.split('href="/tasks/t-typed/"', 1)[1].split("</tr>", 1)[0]
    assert ">5</a>" in row  # runs in 24 h
    assert "25%" in row  # 1 failed of 4 finished
    assert "2.0 s" in row  # p50 of 1, 2 and 3 s


def test_an_operator_triggers_a_run_from_the_generated_form(operator: Client) -> None:
    page = operator.get("/tasks/t-typed/").content.decode()
    assert 'name="payload-name"' in page and 'type="number" name="payload-count"' in page
    assert 'type="checkbox" name="payload-loud"' in page

    response = operator.post(
        "/tasks/t-typed/",
        {
            "payload-name": "<b>ada</b>",
            "payload-count": "3",
            "payload-ratio": "0.25",
            "payload-loud": "on",
            "run-tags": "a, b",
            "run-idempotency_key": "k1",
        },
    )
    run = Run.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/"
    assert run.payload == {"name": "<b>ada</b>", "count": 3, "ratio": 0.25, "loud": True}
    assert run.tags == ["a", "b"] and run.idempotency_key == "k1"
    assert AuditEntry.objects.get(action="trigger").run_ids == [run.pk]


def test_a_bad_int_is_a_field_error_and_creates_nothing(operator: Client) -> None:
    response = operator.post("/tasks/t-typed/", {"payload-name": "x", "payload-count": "many"})
    assert response.status_code == 422
    page = response.content.decode()
    assert "Enter a whole number." in page and 'value="many"' in page
    assert not Run.objects.exists()


def test_literal_and_enum_render_selects_and_a_nested_model_a_json_textarea(
    operator: Client, booking_task: Any
) -> None:
    page = operator.get("/tasks/t-pages-booking/").content.decode()
    assert '<select name="payload-kind"' in page and '<option value="car">' in page
    assert '<select name="payload-color"' in page and '<option value="blue">' in page
    assert '<textarea name="payload-address"' in page
    assert '<textarea name="payload-guests"' in page  # one per line
    assert "null</textarea>" not in page  # no default: an empty box


def test_pydantic_errors_land_on_their_fields_and_a_good_post_validates_the_whole_model(
    operator: Client, booking_task: Any
) -> None:
    bad = {"payload-seats": "0", "payload-kind": "car", "payload-color": "blue", "payload-address": '{"zip": 1}'}
    response = operator.post("/tasks/t-pages-booking/", bad)
    assert response.status_code == 422
    page = response.content.decode()
    assert "greater than or equal to 1" in page and "city: Field required" in page
    assert not Run.objects.exists()

    good = {**bad, "payload-seats": "2", "payload-address": '{"city": "Oslo"}', "payload-guests": "ann\nbob\n"}
    assert operator.post("/tasks/t-pages-booking/", good).status_code == 302
    assert Run.objects.get().payload == {
        "seats": 2,
        "kind": "car",
        "color": "blue",
        "guests": ["ann", "bob"],
        "address": {"city": "Oslo", "zip": ""},
        "note": None,
    }


def test_an_unknown_task_is_a_404(viewer: Client) -> None:
    assert viewer.get("/tasks/no-such-task/").status_code == 404


def test_a_viewer_sees_no_trigger_form(viewer: Client) -> None:
    page = viewer.get("/tasks/t-typed/").content.decode()
    assert 'name="payload-name"' not in page and "Only operators can trigger runs" in page


# --- events -----------------------------------------------------------------------------------------------


def test_sending_an_event_resumes_a_waiting_run(operator: Client) -> None:
    run = Run.objects.create(task_id="t-wait-event", payload={"topic": "moon"}, status=RunStatus.WAITING)
    waitpoint_create(
        run_id=run.pk,
        kind=WaitpointKind.EVENT,
        step_key="review",
        timeout_at=None,
        event_name="report.reviewed",
        match={"topic": "moon"},
    )

    response = operator.post("/events/", {"name": "report.reviewed", "data": '{"topic": "moon", "ok": true}'})
    assert response.status_code == 302 and response["Location"] == "/events/"
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    assert Waitpoint.objects.get(run=run).result == {"topic": "moon", "ok": True}
    page = operator.get("/events/").content.decode()
    assert "report.reviewed" in page and f'href="/runs/{run.pk}/"' in page and "Resumed" in page
    assert AuditEntry.objects.get(action="event_send").run_ids == [run.pk]


def test_invalid_event_json_is_a_form_error(operator: Client) -> None:
    response = operator.post("/events/", {"name": "x", "data": "{nope"})
    assert response.status_code == 422 and "Enter a valid JSON." in response.content.decode()
    assert not Event.objects.exists()


def test_the_events_page_escapes_event_data(viewer: Client) -> None:
    Event.objects.create(name="<script>x</script>", data={"k": "<img src=x>"})
    page = viewer.get("/events/").content.decode()
    assert "<script>x" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page


# --- approvals --------------------------------------------------------------------------------------------


def test_an_approval_with_invalid_form_data_shows_errors_and_the_run_keeps_waiting(operator: Client) -> None:
    run = Run.objects.create(task_id="t-approval", payload={"order": "A-1"}, status=RunStatus.WAITING)
    wp = waitpoint_create(
        run_id=run.pk,
        kind=WaitpointKind.APPROVAL,
        step_key="refund",
        timeout_at=None,
        prompt="Refund order A-1?",
        form="tests.forms.RefundForm",
    )
    page = operator.get("/approvals/").content.decode()
    assert "Refund order A-1?" in page and f'href="/runs/{run.pk}/"' in page
    assert f'name="wp{wp.pk}-amount"' in page and f'name="wp{wp.pk}-reason"' in page

    response = operator.post(
        f"/approvals/{wp.pk}/", {"decision": "approve", f"wp{wp.pk}-amount": "-5", f"wp{wp.pk}-reason": ""}
    )
    assert response.status_code == 422
    page = response.content.decode()
    assert "greater than or equal to 0" in page and "This field is required." in page
    run.refresh_from_db()
    wp.refresh_from_db()
    assert run.status == RunStatus.WAITING and wp.completed_at is None

    response = operator.post(
        f"/approvals/{wp.pk}/",
        {"decision": "approve", f"wp{wp.pk}-amount": "12.50", f"wp{wp.pk}-reason": "damaged", "comment": "ok"},
    )
    assert response.status_code == 302
    wp.refresh_from_db()
    run.refresh_from_db()
    assert wp.result["approved"] is True and wp.result["data"] == {"amount": "12.50", "reason": "damaged"}
    assert run.status == RunStatus.QUEUED
    assert AuditEntry.objects.get(action="approve").run_ids == [run.pk]


def test_the_approvals_page_says_when_nothing_waits(viewer: Client) -> None:
    assert 'id="approvals-empty"' in viewer.get("/approvals/").content.decode()


# --- schedules --------------------------------------------------------------------------------------------


def test_a_schedule_with_a_bad_cron_shows_the_error(operator: Client) -> None:
    response = operator.post(
        "/schedules/", {"task_id": "t-typed", "cron": "every day", "timezone": "Mars/Base", "payload": "{}"}
    )
    assert response.status_code == 422
    page = response.content.decode()
    assert "a cron expression has five fields" in page and "is not an IANA time zone" in page
    assert "name: Field required" in page
    assert not Schedule.objects.exists()


def test_an_operator_creates_edits_and_deletes_a_schedule(operator: Client) -> None:
    data = {"task_id": "t-typed", "cron": "*/5 * * * *", "timezone": "UTC", "payload": '{"name": "x"}', "enabled": "on"}
    assert operator.post("/schedules/", data).status_code == 302
    schedule = Schedule.objects.get()
    assert schedule.payload["name"] == "x" and schedule.next_run_at is not None

    assert 'value="*/5 * * * *"' in operator.get(f"/schedules/{schedule.pk}/").content.decode()
    response = operator.post(f"/schedules/{schedule.pk}/", {**data, "cron": "0 9 * * 1"})
    assert response.status_code == 302
    schedule.refresh_from_db()
    assert schedule.cron == "0 9 * * 1" and schedule.enabled

    assert operator.post(f"/schedules/{schedule.pk}/delete/").status_code == 302
    assert not Schedule.objects.exists()
    actions = set(AuditEntry.objects.values_list("action", flat=True))
    assert {"schedule_create", "schedule_update", "schedule_delete"} <= actions


def test_code_schedules_are_read_only(operator: Client) -> None:
    schedule = Schedule.objects.create(task_id="t-cron", cron="0 0 1 1 *", source=ScheduleSource.CODE)
    page = operator.get("/schedules/").content.decode()
    assert "read-only: declared in code" in page and f"/schedules/{schedule.pk}/delete/" not in page
    operator.post(f"/schedules/{schedule.pk}/delete/")
    assert Schedule.objects.filter(pk=schedule.pk).exists()
    assert operator.get(f"/schedules/{schedule.pk}/").status_code == 302


# --- API keys ---------------------------------------------------------------------------------------------


def test_an_api_key_is_shown_once_and_authenticates(operator: Client, client: Client) -> None:
    response = operator.post("/api-keys/", {"name": "ci-pipeline", "scopes": ["read", "trigger"]})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    page = response.content.decode()
    secret = page.split('id="new-key-secret">', 1)[1].split("<", 1)[0]
    key = ApiKey.objects.get()
    assert secret.startswith(key.prefix)

    assert secret not in operator.get("/api-keys/").content.decode()
    assert client.get("/api/tasks", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200

    assert operator.post(f"/api-keys/{key.pk}/revoke/").status_code == 302
    assert client.get("/api/tasks", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401
    assert {"apikey_create", "apikey_revoke"} <= set(AuditEntry.objects.values_list("action", flat=True))


class Opaque:
    """A type pydantic can't build a schema for."""


def _opaque(ctx: Any, thing: Opaque) -> None:
    return None


@pytest.fixture
def opaque_task() -> Iterator[Any]:
    t = task("t-pages-opaque")(_opaque)
    yield t
    registry.unregister(t.id)


def test_a_task_whose_hints_make_no_form_still_has_a_page(operator: Client, opaque_task: Any) -> None:
    response = operator.get("/tasks/t-pages-opaque/")
    assert response.status_code == 200 and 'id="no-trigger-form"' in response.content.decode()
    assert operator.post("/tasks/t-pages-opaque/", {"payload-thing": "x"}).status_code == 422
    assert not Run.objects.exists()


def test_htmx_swaps_the_trigger_form_with_its_errors_and_redirects_the_browser_on_success(operator: Client) -> None:
    response = operator.post("/tasks/t-typed/", {"payload-count": "2"}, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 200 and page.lstrip().startswith('<section class="card" id="trigger">')
    assert "This field is required." in page

    response = operator.post("/tasks/t-typed/", {"payload-name": "x"}, HTTP_HX_REQUEST="true")
    assert response["HX-Redirect"] == f"/runs/{Run.objects.get().pk}/"


def test_htmx_swaps_one_approval_card(operator: Client) -> None:
    run = Run.objects.create(task_id="t-approval", payload={"order": "B"}, status=RunStatus.WAITING)
    wp = waitpoint_create(
        run_id=run.pk, kind=WaitpointKind.APPROVAL, step_key="refund", timeout_at=None, form="tests.forms.RefundForm"
    )
    url = f"/approvals/{wp.pk}/"
    response = operator.post(url, {"decision": "approve", f"wp{wp.pk}-amount": "x"}, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 200 and page.lstrip().startswith(
        f'<article class="card approval" id="approval-{wp.pk}">'
    )
    assert "Enter a number." in page and "<html" not in page

    response = operator.post(url, {"decision": "reject", "comment": "<no>"}, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert f'id="approval-{wp.pk}"' in page and "Rejected" in page
    wp.refresh_from_db()
    assert wp.result["approved"] is False and wp.result["comment"] == "<no>"
    assert operator.post(url, {"decision": "reject"}, HTTP_HX_REQUEST="true")["HX-Redirect"] == "/approvals/"
