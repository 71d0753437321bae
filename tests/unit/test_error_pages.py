"""The dashboard's own 400/403/404/500 pages, for htmx requests too, and never Django's debug page, even with
DEBUG on (DESIGN.md §6)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from runs.models import Run, RunStatus

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def viewer() -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(get_user_model().objects.create_user("viewer", password="pw-viewer-123"))
    return client


@pytest.fixture(params=[False, True], ids=["production", "debug"])
def debug(request: pytest.FixtureRequest, settings: Any) -> bool:
    settings.DEBUG = request.param
    return request.param


def test_a_missing_run_or_page_is_the_dashboards_404(viewer: Client, debug: bool) -> None:
    for path in ("/runs/01a24500-0000-7000-8000-000000000000/", "/does-not-exist/"):
        response = viewer.get(path)
        html = response.content.decode()
        assert response.status_code == 404
        assert 'data-error-status="404"' in html and "Not found" in html and "Back to the runs" in html
        assert "URLconf" not in html and "DEBUG = True" not in html


def test_an_htmx_request_gets_a_notice_for_the_error_slot_not_a_document(viewer: Client, debug: bool) -> None:
    response = viewer.get("/runs/01a24500-0000-7000-8000-000000000000/step/?step=x", **HTMX)
    html = response.content.decode()
    # 200, as htmx swaps no error response: the status is in X-Dex-Error, the notice goes to #dex-error.
    assert response.status_code == 200 and response["X-Dex-Error"] == "404"
    assert "<html" not in html and 'class="notice notice-error"' in html
    assert response["HX-Retarget"] == "#dex-error" and response["HX-Reswap"] == "innerHTML"


def test_a_viewers_action_is_the_dashboards_403(viewer: Client, debug: bool) -> None:
    run = Run.objects.create(task_id="t-typed", status=RunStatus.WAITING)
    response = viewer.post(f"/runs/{run.pk}/cancel/", **HTMX)
    assert response["X-Dex-Error"] == "403" and "Not allowed" in response.content.decode()
    assert response["HX-Retarget"] == "#dex-error"
    assert viewer.post(f"/runs/{run.pk}/cancel/").status_code == 403


def test_an_unexpected_error_is_the_dashboards_500_without_a_settings_dump(
    viewer: Client, debug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runs.web import fragments

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("SECRET_KEY=oops")

    monkeypatch.setattr(fragments, "run_detail_context", broken)
    response = viewer.get("/runs/01a24500-0000-7000-8000-000000000000/")
    html = response.content.decode()
    assert response.status_code == 500 and "Something went wrong" in html
    assert "SECRET_KEY" not in html and "Traceback" not in html


def test_an_oversized_post_is_the_dashboards_413_notice(debug: bool, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    operator = Client(raise_request_exception=False)
    user = get_user_model().objects.create_superuser("op", password="pw-op-123456")
    operator.force_login(user)
    response = operator.post("/tasks/t-typed/", {"payload-name": "x" * 5000}, **HTMX)
    html = response.content.decode()
    assert response["X-Dex-Error"] == "413" and "Form too large" in html and "<html" not in html
    assert "the limit is 1,000 bytes" in html
    response = operator.post("/tasks/t-typed/", {"payload-name": "x" * 5000})  # without htmx: a page
    assert response.status_code == 413 and "<html" in response.content.decode()
