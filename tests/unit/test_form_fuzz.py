"""Hypothesis over every dashboard form, through Django's test client as an operator: each page is fetched,
each `<form>` on it read (action, method, field names, the choices of its selects), and generated values sent
— mostly the form's own values with one or more fields swapped for an edge case (tests/fuzzing.py), so the
fuzzer gets past the first check and into the service behind it. A 500 (or any exception a view raises) fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import pytest
from django.test import Client
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from runs.engine import waitpoint_create
from runs.models import (
    AlertChannel,
    AlertDestination,
    ApiKey,
    Run,
    RunStatus,
    Schedule,
    Step,
    StepStatus,
    WaitpointKind,
)
from tests.conftest import logged_in, persona
from tests.fuzzing import Tally, edge_form_text, fuzz_settings

pytestmark = pytest.mark.django_db

tally = Tally("dashboard form fuzzer")

# Every dashboard page with a form (the URLs of DESIGN §6); {names} are filled from the world below.
PAGES = [
    "/",
    "/audit/",
    "/tasks/",
    "/tasks/t-typed/",
    "/tasks/hello-steps/",
    "/tasks/t-fails/",
    "/events/",
    "/approvals/",
    "/schedules/",
    "/schedules/{schedule}/",
    "/alerts/",
    "/alerts/{destination}/",
    "/api-keys/",
    "/usage/",
    "/runs/{waiting}/",
    "/runs/{failed}/",
    "/login/",
]
# Forms whose success ends the fuzzing session (the operator logs out) are left out.
SKIPPED_ACTIONS = {"/logout/"}


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\n{tally.summary()}")


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, list[str]] = field(default_factory=dict)  # name -> values seen (choices, defaults)


class FormParser(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.page = page
        self.forms: list[Form] = []
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "option":
            if self._select and self.forms:
                self.forms[-1].fields[self._select].append(a.get("value", ""))
            return
        if tag == "form":
            action = urljoin(self.page, a.get("action") or self.page)
            self.forms.append(Form(urlsplit(action).path, (a.get("method") or "get").lower()))
            return
        if not self.forms or not a.get("name") or a["name"] == "csrfmiddlewaretoken":
            return
        values = self.forms[-1].fields.setdefault(a["name"], [])
        if tag == "input":
            values.append(a.get("value", "on" if a.get("type") == "checkbox" else ""))
        elif tag == "select":
            self._select = a["name"]
        elif tag == "textarea":
            self._textarea = a["name"]
            values.append("")
        elif tag == "button" and a.get("value"):
            values.append(a["value"])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        if self._textarea and self.forms and data.strip():
            self.forms[-1].fields[self._textarea][-1] = data.strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None


def forms_on(page: str, html: str) -> list[Form]:
    parser = FormParser(page)
    parser.feed(html)
    return [f for f in parser.forms if f.action not in SKIPPED_ACTIONS]


@pytest.fixture
def world() -> dict[str, Any]:
    now = timezone.now()
    waiting = Run.objects.create(task_id="t-typed", status=RunStatus.WAITING, payload={"name": "Ada", "count": 1})
    Step.objects.create(
        run=waiting, key="first", seq=0, status=StepStatus.COMPLETED, output=1, started_at=now, finished_at=now
    )
    waitpoint_create(
        run_id=waiting.pk,
        kind=WaitpointKind.APPROVAL,
        step_key="approve",
        timeout_at=None,
        prompt="Refund?",
        form="tests.forms.RefundForm",
    )
    failed = Run.objects.create(
        task_id="t-typed",
        status=RunStatus.FAILED,
        payload={"name": "Bo", "count": 2},
        error={"type": "ValueError", "message": "boom", "step": "second"},
        finished_at=now,
    )
    Step.objects.create(
        run=failed, key="first", seq=0, status=StepStatus.COMPLETED, output=1, started_at=now, finished_at=now
    )
    Step.objects.create(run=failed, key="second", seq=1, status=StepStatus.FAILED, started_at=now, finished_at=now)
    schedule = Schedule.objects.create(task_id="t-typed", cron="0 0 1 1 *", payload={"name": "Ada", "count": 1})
    ApiKey.generate(name="to-revoke")
    # TEST-NET-1: refused by safe_fetch before any connection, so "Send test alert" costs nothing.
    destination = AlertDestination.objects.create(kind=AlertChannel.WEBHOOK, target="http://192.0.2.1/hook")
    return {"waiting": waiting.pk, "failed": failed.pk, "schedule": schedule.pk, "destination": destination.pk}


def value_for(seen: list[str]) -> st.SearchStrategy[str]:
    own = [v for v in seen if v is not None]
    return st.one_of(st.sampled_from(own), edge_form_text()) if own else edge_form_text()


def encode(data: dict[str, list[str]]) -> bytes:
    # surrogatepass: a lone surrogate arrives as the invalid UTF-8 a browser or script could send.
    return urlencode(data, doseq=True, encoding="utf-8", errors="surrogatepass").encode()


def send(client: Client, form: Form, data: dict[str, list[str]]) -> Any:
    if form.method == "post":
        return client.post(form.action, data=encode(data), content_type="application/x-www-form-urlencoded")
    return client.get(form.action + "?" + encode(data).decode())


@pytest.mark.parametrize("page", PAGES)
def test_no_generated_form_post_makes_a_page_answer_500(page: str, world: dict[str, Any], settings: Any) -> None:
    settings.DEX_ALERT_TIMEOUT_SECONDS = 1
    # The login form is fuzzed anonymously (a signed-in user is sent on from it).
    operator = Client() if page == "/login/" else logged_in(persona("operator"))
    url = page.format(**world)
    response = operator.get(url)
    assert response.status_code == 200, url
    forms = forms_on(url, response.content.decode())
    if not forms:
        return  # a page whose forms all end the session
    print(f"\n{url}: " + ", ".join(f"{f.method.upper()} {f.action} {sorted(f.fields)}" for f in forms))

    @fuzz_settings(12)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        form = data.draw(st.sampled_from(forms), label="form")
        values: dict[str, list[str]] = {}
        for name, seen in form.fields.items():
            choice = data.draw(st.sampled_from(["own", "edge", "absent", "many"]), label=name)
            if choice == "absent":
                continue
            if choice == "many":
                values[name] = data.draw(st.lists(value_for(seen), min_size=2, max_size=3), label=name)
            else:
                values[name] = [data.draw(value_for(seen) if choice == "edge" else st.sampled_from(seen or [""]))]
        response = send(operator, form, values)
        tally.record(response.status_code)
        assert response.status_code < 500, f"{form.method.upper()} {form.action} {values!r}"

    fuzz()
