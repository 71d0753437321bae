"""schemathesis against `/api/openapi.json`: generated requests (valid and invalid) to every operation, with
a key that may do everything, through Django's WSGI app on the test database; every check schemathesis has
(no server error, status codes / content types / headers / bodies as documented, negative data rejected,
…). Bounded: a few examples per operation; DEX_FUZZ_EXAMPLES runs it longer (tests/fuzzing.py), and the
number of requests sent is printed when the module ends (`-s`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections

from runs.ops.audit import Actor
from tests.fuzzing import Tally, fuzz_settings

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/openapi.json", get_wsgi_application())
tally = Tally("schemathesis")


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\n{tally.summary()}")


@pytest.fixture(autouse=True)
def keep_the_test_connection() -> Iterator[None]:
    """The WSGI handler closes the database connection after each request (request_finished), which would
    close the test's transaction; Django's own test client disconnects it the same way."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def auth_header() -> dict[str, str]:
    from runs import services

    _key, secret = services.apikey_create(name="fuzz", by=Actor.system("tests"))
    return {"Authorization": f"Bearer {secret}"}


@schema.parametrize()
@fuzz_settings(8)
def test_the_api_honours_its_schema(case: schemathesis.Case, auth_header: dict[str, str]) -> None:
    response = case.call(headers=auth_header)
    tally.record(response.status_code)
    # As call_and_validate does it, with the request's headers (some checks send it again, without the key).
    case.validate_response(response, headers=auth_header, transport_kwargs={"headers": dict(auth_header)})


def test_a_date_filter_outside_what_a_uuid7_holds_is_an_empty_page_not_a_500(auth_header: dict[str, str]) -> None:
    """Found by the fuzzer: the id bound of a date filter overflowed for years before 1970."""
    from django.test import Client

    from runs import services

    run, _ = services.run_trigger(task_id="t-typed", payload={"name": "a"})
    client = Client(HTTP_AUTHORIZATION=auth_header["Authorization"])
    before_1970 = client.get("/api/runs?created_before=0260-05-20T13:19:11Z")
    assert before_1970.status_code == 200, before_1970.content
    assert before_1970.json()["items"] == []
    since_1322 = client.get("/api/runs?created_after=1322-10-19T20:25:54Z")
    assert since_1322.status_code == 200, since_1322.content
    assert [item["id"] for item in since_1322.json()["items"]] == [str(run.pk)]
