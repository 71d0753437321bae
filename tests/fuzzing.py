"""What the fuzzers share: the inputs that broke Dex before (issue 12) and a budget.

`DEX_FUZZ_EXAMPLES` sets the number of generated examples per fuzzed target (default: a few, so the suite stays
within its CI budget); `DEX_FUZZ_EXAMPLES=2000 uv run pytest tests/unit/test_*fuzz*.py` runs them longer.
Every request a fuzzer sends is counted, and the counts are printed when its module ends (`-s` shows them).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def examples(default: int) -> int:
    return int(os.environ.get("DEX_FUZZ_EXAMPLES") or default)


def fuzz_settings(default: int) -> Any:
    """Hypothesis settings for one fuzzed target: no deadline (a request renders a page), no example database
    (the suite must not depend on what an earlier run found), health checks off (function-scoped fixtures)."""
    return settings(
        max_examples=examples(default), deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


# Text that has broken an app like this one: NUL and lone surrogates (Postgres can't store them), the ends of
# the calendar, numbers past 64 bits, cron and URL shapes from the probe, markup, and size.
EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "%00",
    "\ud800",
    "x\udcff",
    "\U0001d54f\u200b\u202e",
    "0",
    "-1",
    "1e309",
    "NaN",
    "Infinity",
    str(2**63),
    str(-(2**63) - 1),
    "9" * 40,
    "0001-01-01",
    "9999-12-31",
    "0000-00-00",
    "2025-02-30",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-05:00",
    "1-0 * * * *",
    "*/99999999999999999999 * * * *",
    "* * * * 7-1",
    "0 0 30 2 *",
    "* * * * *",
    "http://127.0.0.1:1/",
    "http://169.254.169.254/latest/meta-data/",
    "ftp://example.com/",
    "<script>alert(1)</script>",
    "' OR 1=1 --",
    "../../etc/passwd",
    "{}",
    "[]",
    '{"name": "x\\u0000"}',
    '{"name": "x\\ud800"}',
    '"\\ud800"',
    "null",
    "true",
    "x" * 5000,
    "UTC",
    "t-typed",
    "hello-steps",
]


def edge_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EDGE_STRINGS),
        st.text(max_size=40),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.dates().map(str),
        st.datetimes().map(lambda d: d.isoformat() + "Z"),
    )


def edge_json(depth: int = 2) -> st.SearchStrategy[Any]:
    """JSON values built from the edge cases: huge and negative integers, floats at the ends, edge strings, and
    lists / objects (with edge keys) of those."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**29]),
        st.floats(allow_nan=False, allow_infinity=False),
        edge_text(),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(edge_text(), children, max_size=4)),
        max_leaves=8,
    )


class Tally:
    """Requests sent and server errors seen, per fuzzer, printed when the module's tests end."""

    def __init__(self, name: str):
        self.name = name
        self.counts: Counter[str] = Counter()

    def record(self, status: int) -> None:
        self.counts["requests"] += 1
        if status >= 500:
            self.counts["server_errors"] += 1

    def summary(self) -> str:
        errors, requests = self.counts["server_errors"], self.counts["requests"]
        return f"{self.name}: {errors} server errors in {requests} generated requests"


def edge_form_text() -> st.SearchStrategy[str]:
    """What a form field may receive: an edge string, or edge JSON as text (a JSON field's `"\\u0000"` escape
    parses into a NUL)."""
    return st.one_of(edge_text(), edge_json().map(json.dumps))
