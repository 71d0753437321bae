"""The trigger form honours the task's signature: `Annotated` / pydantic `Field` constraints become form
constraints and form errors (server-side, never the browser's own check), long text gets a multi-line box, the
docstring is Markdown made safe with nh3, and bad input (NUL characters, a megabyte in a field) is a form error,
never a 500 or a debug page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from pydantic import Field

from runs.models import Run
from runs.sdk import task
from runs.sdk.registry import registry
from runs.templatetags.dex_run import markdown
from runs.web.forms import TEXT_MAX_CHARS

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_user("operator", password="pw-operator-123")
    user.user_permissions.add(Permission.objects.get(codename="operate_runs", content_type__app_label="runs"))
    client = Client()
    client.force_login(user)
    return client


def _forms_task(
    ctx: Any,
    diff: Annotated[str, Field(min_length=1, json_schema_extra={"format": "textarea"})],
    steps: Annotated[int, Field(ge=1, le=50)] = 5,
    delay: Annotated[float, Field(ge=0)] = 0.3,
    code: Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["ABC"])] = "ABC",
    extra: dict | None = None,
) -> str:
    """Reviews a `diff`.

    Hard-wrapped lines
    join into one paragraph. <script>alert(1)</script>
    """
    return diff


@pytest.fixture
def forms_task() -> Iterator[Any]:
    t = task("t-forms")(_forms_task)
    yield t
    registry.unregister(t.id)


def post(client: Client, data: dict[str, str], **extra: Any) -> tuple[int, str]:
    response = client.post("/tasks/t-forms/", {"payload-diff": "+x = 1\n", **data}, **extra)
    return response.status_code, response.content.decode()


def errors_of(html: str, field: str) -> str:
    return html.split(f'name="payload-{field}"', 1)[1].split('class="field', 1)[0]


def test_the_form_shows_constraints_a_textarea_and_the_docstring_as_safe_markdown(
    operator: Client, forms_task: Any
) -> None:
    html = operator.get("/tasks/t-forms/").content.decode()
    assert '<textarea name="payload-diff"' in html and "novalidate" in html
    assert 'min="1"' in html and 'max="50"' in html  # the bounds, shown by the number input
    assert "≥ 1, ≤ 50" in html and "matching ^[A-Z]{3}$; e.g. ABC" in html
    assert "<code>diff</code>" in html and "Hard-wrapped lines\njoin into one paragraph." in html
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"payload-steps": "-5"}, "steps", "greater than or equal to 1"),
        ({"payload-steps": "51"}, "steps", "less than or equal to 50"),
        ({"payload-delay": "-1"}, "delay", "greater than or equal to 0"),
        ({"payload-code": "abc"}, "code", "Must match ^[A-Z]{3}$"),
        ({"payload-diff": ""}, "diff", "This field is required"),
        ({"payload-diff": "a\x00b"}, "diff", "Null characters are not allowed"),
        ({"payload-extra": '{"k": "a\\u0000b"}'}, "extra", "k: text can&#x27;t contain NUL"),
        # Over the form's own cap but under the request's: a form error (a request over DEX_MAX_PAYLOAD_BYTES is
        # the dashboard's 413 notice: tests/unit/test_error_pages.py).
        ({"payload-diff": "x" * (TEXT_MAX_CHARS + 1)}, "diff", f"at most {TEXT_MAX_CHARS} characters"),
    ],
)
def test_bad_input_is_a_form_error_on_its_field(
    operator: Client, forms_task: Any, data: dict[str, str], field: str, message: str
) -> None:
    status, html = post(operator, data)
    assert status == 422 and message in errors_of(html, field), html[-3000:]
    status, html = post(operator, data, **HTMX)  # the form region, in the page, for htmx
    assert status == 200 and message in html and "<html" not in html
    assert not Run.objects.exists()


def test_a_multi_line_diff_arrives_whole(operator: Client, forms_task: Any) -> None:
    diff = "--- a/x.py\n+++ b/x.py\n@@ -0,0 +1,2 @@\n+x = eval(y)\n+z = 2\n"
    # A browser sends a textarea's line breaks as CRLF; the agent gets the text as typed.
    status, _ = post(operator, {"payload-diff": diff.replace("\n", "\r\n")})
    assert status == 302
    assert Run.objects.get().payload["diff"] == diff.rstrip("\n")  # Django strips the trailing newline


def test_the_task_page_names_the_queue_the_workers_consume(operator: Client, forms_task: Any, settings: Any) -> None:
    html = operator.get("/tasks/t-forms/").content.decode()
    assert f"<dd>{settings.DEX_DEFAULT_QUEUE}</dd>" in html and "<dd>default</dd>" not in html


def test_markdown_drops_what_could_run() -> None:
    html = markdown("[x](javascript:alert(1)) <img src=x onerror=alert(2)> **bold** `code`")
    assert 'href="javascript' not in html and "<img" not in html and "<strong>bold</strong>" in html
    assert "<code>code</code>" in html
