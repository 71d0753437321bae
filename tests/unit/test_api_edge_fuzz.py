"""Hypothesis against every API operation with the inputs that broke Dex before (tests/fuzzing.py): NULs and
lone surrogates in paths, queries and bodies, the ends of the calendar, integers past 64 bits, wrong shapes.
schemathesis (test_api_fuzz.py) generates from the schema; this one aims at what the schema can't express.
Every answer must be JSON and below 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.test import Client
from hypothesis import given
from hypothesis import strategies as st

from runs.api.views import api
from runs.models import ApiKey, Run, Waitpoint
from tests.fuzzing import Tally, edge_json, edge_text, fuzz_settings

pytestmark = pytest.mark.django_db

tally = Tally("API edge fuzzer")
SCHEMA = api.get_openapi_schema()
OPERATIONS = [(path, method.upper()) for path, ops in SCHEMA["paths"].items() for method in ops]


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\n{tally.summary()}")


@pytest.fixture
def world() -> dict[str, str]:
    run = Run.objects.create(task_id="t-typed", payload={"name": "x"}, status="waiting")
    waitpoint = Waitpoint.objects.create(run=run, step_key="wait", kind="token", token="tok-fuzz")
    failed = Run.objects.create(task_id="t-typed", payload={"name": "y"}, status="failed")
    return {"run_id": str(run.pk), "failed": str(failed.pk), "token": waitpoint.token}


@pytest.fixture
def client() -> Client:
    _key, secret = ApiKey.generate(name="edge-fuzz")
    return Client(headers={"authorization": f"Bearer {secret}"}, enforce_csrf_checks=True)


def _url_part(value: str) -> str:
    # surrogatepass: a lone surrogate travels as the (invalid) UTF-8 bytes a real client could send.
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def path_values(world: dict[str, str]) -> dict[str, st.SearchStrategy[str]]:
    return {
        "task_id": st.one_of(st.sampled_from(["t-typed", "hello-steps", "t-fails"]), edge_text()),
        "run_id": st.one_of(st.sampled_from([world["run_id"], world["failed"]]), edge_text()),
        "token": st.one_of(st.just(world["token"]), edge_text()),
    }


def body_strategy(path: str, method: str) -> st.SearchStrategy[Any]:
    """A JSON body: the operation's own fields (from the schema) with edge values, or any edge JSON."""
    operation = SCHEMA["paths"][path][method.lower()]
    ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
    fields: list[str] = []
    if ref:
        fields = list(SCHEMA["components"]["schemas"][ref.rsplit("/", 1)[1]].get("properties", {}))
    payload = st.fixed_dictionaries(
        {}, optional={"name": edge_text(), "count": st.one_of(st.integers(), edge_text()), "steps": edge_json()}
    )
    known = st.fixed_dictionaries(
        {}, optional={name: (payload if name == "payload" else edge_json()) for name in fields}
    )
    return st.one_of(known, edge_json())


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_no_edge_input_makes_an_operation_answer_500(
    client: Client, world: dict[str, str], path: str, method: str
) -> None:
    params = re.findall(r"{(\w+)}", path)
    strategies = path_values(world)
    filters = ["status", "task", "tag", "version", "created_after", "created_before", "cursor", "limit", "x"]

    @fuzz_settings(15)
    @given(
        values=st.fixed_dictionaries({name: strategies[name] for name in params}),
        query=st.dictionaries(st.sampled_from(filters), edge_text(), max_size=3),
        body=body_strategy(path, method),
        raw=st.sampled_from([None, b"", b"{", b"\xff\xfe", b'{"payload": {"name": "\\ud800"}}', b"[1e999]"]),
    )
    def fuzz(values: dict[str, str], query: dict[str, str], body: Any, raw: bytes | None) -> None:
        url = "/api" + re.sub(r"{(\w+)}", lambda m: _url_part(values[m[1]]), path)
        if query:
            url += "?" + urlencode(query, encoding="utf-8", errors="surrogatepass")
        data = raw if raw is not None else json.dumps(body).encode()
        response = client.generic(method, url, data=data, content_type="application/json")
        tally.record(response.status_code)
        assert response.status_code < 500, f"{method} {url} {data[:200]!r} -> {response.content[:300]!r}"
        assert response["Content-Type"].startswith("application/json"), f"{method} {url}"

    fuzz()
