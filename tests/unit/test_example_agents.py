"""The example agents of agents/, each run end to end in-process against the local LLM server."""

from __future__ import annotations

import json

import pytest

from runs.models import RunStatus
from runs.ops.audit import Actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def llm_server(settings):
    """Start the local OpenAI-compatible server (optionally with a script) and route every model to it."""
    from runs.ai.testserver import serve_in_thread

    servers = []

    def start(script: dict | list | None = None) -> str:
        server, base_url = serve_in_thread(script=script)
        servers.append(server)
        settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
        return base_url

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def llm(llm_server):
    return llm_server()


# --- research-agent ---------------------------------------------------------------------------------------


def test_research_agent_cites_real_python_reference_topics(llm):
    from pydoc_data.topics import topics

    from runs.testing import run_task

    run = run_task("research-agent", {"topic": "python context managers", "depth": 3})
    assert run.status == RunStatus.COMPLETED, run.error
    out = run.output
    # The model's answer wasn't a list of queries: the topic and its keywords were searched instead.
    assert out["queries"] == ["python context managers", "context", "managers"]
    keys = [s.key for s in run.steps.order_by("seq")]
    assert keys == ["plan", "search", "search#1", "search#2", "summarise"]
    cited = [s["topic"] for s in out["sources"]]
    assert cited and all(topic in topics for topic in cited)
    assert "context-managers" in cited
    assert "[context-managers]" in out["report"]
    assert out["report"].startswith("Summary: Write a report on: python context managers")
    assert run.metadata["progress"] == {"stage": "done", "sources": len(cited)}
    summarise = run.steps.get(key="summarise")
    assert summarise.meta["usage"]["model"] == "gpt-5-mini"


def test_research_agent_searches_the_queries_the_model_planned(llm_server):
    from runs.testing import run_task

    llm_server([{"contains": "search queries", "reply": "1. try statement\n2. raise exceptions\n- finally clause"}])
    run = run_task("research-agent", {"topic": "error handling", "depth": 3})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["queries"] == ["try statement", "raise exceptions", "finally clause"]
    searched = [s.output["query"] for s in run.steps.filter(key__startswith="search").order_by("seq")]
    assert searched == run.output["queries"]
    assert {"try", "raise"} <= {s["topic"] for s in run.output["sources"]}


# --- code-review-agent ------------------------------------------------------------------------------------

NEW_FILE_DIFF = """\
diff --git a/app/util.py b/app/util.py
new file mode 100644
index 0000000..3b18e51
--- /dev/null
+++ b/app/util.py
@@ -0,0 +1,6 @@
+import os
+import json
+
+
+def dump(value):
+    return json.dumps(value)
"""

MODIFIED_DIFF = """\
diff --git a/app/models.py b/app/models.py
index 1111111..2222222 100644
--- a/app/models.py
+++ b/app/models.py
@@ -10,6 +10,8 @@ class Order:
     def total(self):
-        return sum(self.items)
+        import decimal
+        if self.discount == None:
+            return sum(self.items)
         return sum(self.items) - self.discount


"""


def test_code_review_finds_an_unused_import_with_ruff(llm):
    from runs.testing import run_task

    run = run_task("code-review-agent", {"diff": NEW_FILE_DIFF})
    assert run.status == RunStatus.COMPLETED, run.error
    out = run.output
    assert [(f["file"], f["line"], f["code"]) for f in out["findings"]] == [("app/util.py", 1, "F401")]
    assert "`os` imported but unused" in out["findings"][0]["message"]
    assert out["verdict"] == "request_changes"
    assert out["review"].startswith("Summary: ")
    assert [s.key for s in run.steps.order_by("seq")] == ["lint", "review"]


def test_code_review_of_a_partial_hunk_reports_only_what_the_hunk_shows(llm):
    from dex_agents.code_review import parse_diff

    from runs.testing import run_task

    (new,) = parse_diff(MODIFIED_DIFF)
    assert new.added == {11, 12, 13} and new.lines[10] == "    def total(self):" and not new.whole
    run = run_task("code-review-agent", {"diff": MODIFIED_DIFF})
    assert run.status == RunStatus.COMPLETED, run.error
    # `decimal` may be used further down the file, which the diff doesn't show: not reported. `== None` is.
    assert [(f["line"], f["code"]) for f in run.output["findings"]] == [(12, "E711")]
    assert run.output["verdict"] == "request_changes"


def test_code_review_approves_a_clean_diff(llm):
    from runs.testing import run_task

    clean = NEW_FILE_DIFF.replace("+import os\n", "+import sys\n").replace(
        "json.dumps(value)", "json.dumps(value) + sys.version"
    )
    run = run_task("code-review-agent", {"diff": clean})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["findings"] == [] and run.output["verdict"] == "approve"


def test_code_review_without_ruff_fails_saying_how_to_install_it(llm, monkeypatch):
    import importlib.util

    from runs.testing import run_task

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ruff" else real(name, *a))
    run = run_task("code-review-agent", {"diff": NEW_FILE_DIFF})
    assert run.status == RunStatus.FAILED
    assert run.error["step"] == "lint"
    assert "ruff, which is not installed" in run.error["message"] and "uv sync" in run.error["message"]
    assert run.steps.get(key="lint").attempts == 1  # nothing a retry could fix


# --- booking-saga -----------------------------------------------------------------------------------------


@pytest.fixture
def bookings(settings, tmp_path):
    settings.DEX_BOOKING_DIR = str(tmp_path / "booking")
    from dex_agents import booking_service

    return booking_service


def test_booking_saga_books_all_three(bookings):
    from runs.testing import run_task

    run = run_task("booking-saga", {"trip": "Lisbon, 3-7 June"})
    assert run.status == RunStatus.COMPLETED, run.error
    booked = run.output["bookings"]
    assert set(booked) == {"flight", "hotel", "car"}
    assert all(bookings.get(b)["status"] == "booked" for b in booked.values())
    assert run.output["total"] == 420.0 + 180.0 + 65.0
    assert [(e["op"], e["kind"]) for e in bookings.ledger(run.id)] == [
        ("book", "flight"),
        ("book", "hotel"),
        ("book", "car"),
    ]


def test_booking_saga_refunds_hotel_then_flight_when_the_car_fails(bookings):
    from runs.testing import run_task

    run = run_task("booking-saga", {"trip": "Oslo", "fail_at": "car"})
    assert run.status == RunStatus.FAILED
    assert run.error["step"] == "book-car" and "no car available" in run.error["message"]
    assert run.error["compensated"] == ["book-hotel", "book-flight"]
    assert [(e["op"], e["kind"]) for e in bookings.ledger(run.id)] == [
        ("book", "flight"),
        ("book", "hotel"),
        ("refund", "hotel"),
        ("refund", "flight"),
    ]
    keys = [s.key for s in run.steps.order_by("seq")]
    assert keys == ["book-flight", "book-hotel", "book-car", "compensate:book-hotel", "compensate:book-flight"]
    assert run.steps.get(key="book-car").attempts == 1  # sold out is not retried


def test_booking_is_idempotent_by_key(bookings):
    first = bookings.book_flight(key="run-1:book-flight", trip="Rome")
    again = bookings.book_flight(key="run-1:book-flight", trip="Rome")
    assert again == first
    bookings.refund(first["id"])
    bookings.refund(first["id"])
    assert [e["op"] for e in bookings.ledger("run-1")] == ["book", "refund"]


# --- support-agent ----------------------------------------------------------------------------------------

SUPPORT_PAYLOAD = {"customer": "Ada", "message": "I was charged twice for my March invoice, please refund one."}


def _start_support_run():
    from runs.models import Run
    from runs.testing import RunDidNotFinish, run_task

    with pytest.raises(RunDidNotFinish):
        run_task("support-agent", SUPPORT_PAYLOAD)
    run = Run.objects.get(task_id="support-agent")
    assert run.status == RunStatus.WAITING
    return run


def test_support_agent_sends_the_reply_the_approver_edited(llm):
    from runs import services
    from runs.testing import drive

    run = _start_support_run()
    assert [s.key for s in run.steps.order_by("seq")][:2] == ["classify", "draft"]
    wp = run.waitpoints.get(step_key="send-reply")
    assert wp.form == "dex_agents.support.SendReplyForm"
    assert "billing reply to Ada" in wp.prompt and "Summary: I was charged twice" in wp.prompt
    assert not run.steps.filter(key="send").exists()  # nothing sent before approval

    edited = "Hi Ada, sorry about that: we refunded the duplicate charge today."
    services.waitpoint_complete(
        token=wp.token, data={"approved": True, "data": {"reply": edited}}, by=Actor.system("tests")
    )
    run = drive(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["status"] == "sent" and run.output["reply"] == edited and run.output["edited"]
    assert run.output["category"] == "billing"
    assert run.steps.get(key="send").output["reply"] == edited


def test_support_agent_sends_the_draft_when_approved_unedited(llm):
    from runs import services
    from runs.testing import drive

    run = _start_support_run()
    wp = run.waitpoints.get(step_key="send-reply")
    services.waitpoint_complete(
        token=wp.token, data={"approved": True, "data": {"reply": ""}}, by=Actor.system("tests")
    )
    run = drive(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["status"] == "sent" and not run.output["edited"]
    assert run.output["reply"].startswith("Summary: I was charged twice")


def test_support_agent_sends_nothing_when_rejected(llm):
    from runs import services
    from runs.testing import drive

    run = _start_support_run()
    wp = run.waitpoints.get(step_key="send-reply")
    services.waitpoint_complete(
        token=wp.token, data={"approved": False, "comment": "escalate to billing"}, by=Actor.system("tests")
    )
    run = drive(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["status"] == "rejected" and run.output["comment"] == "escalate to billing"
    assert run.output["draft"].startswith("Summary: I was charged twice")
    assert not run.steps.filter(key="send").exists()


# --- fan-out-summariser -----------------------------------------------------------------------------------


def test_fan_out_summariser_returns_one_summary_per_document_in_order(llm):
    from runs.testing import run_task

    documents = [
        "Alpha: the quarterly revenue grew by twelve percent, led by the European market.",
        "Bravo: the new warehouse opened in Leeds and cut delivery times to two days.",
        "Charlie: customer churn fell after the support team adopted the new ticketing tool.",
    ]
    run = run_task("fan-out-summariser", {"documents": documents})
    assert run.status == RunStatus.COMPLETED, run.error
    summaries = run.output["summaries"]
    assert len(summaries) == 3
    for summary, document in zip(summaries, documents, strict=True):
        assert summary == "Summary: " + " ".join(document.split()[:12])
    children = list(run.children.order_by("created_at"))
    assert len(children) == 3 and {c.task_id for c in children} == {"summarise-document"}
    assert all(c.status == RunStatus.COMPLETED for c in children)
    assert run.output["overview"].startswith("Summary: 1. Summary: Alpha:")
    assert [s.key for s in run.steps.order_by("seq")] == ["summarise", "combine"]


def test_fan_out_summariser_with_no_documents(llm):
    from runs.testing import run_task

    run = run_task("fan-out-summariser", {"documents": []})
    assert run.status == RunStatus.COMPLETED and run.output == {"summaries": [], "overview": ""}


# --- pydantic-research-agent (Pydantic AI, durable through DexAgent) ----------------------------------------


def test_pydantic_research_agent_searches_reads_and_answers_offline(llm):
    from runs.testing import run_task

    run = run_task("pydantic-research-agent", {"question": "how do context managers work"})
    assert run.status == RunStatus.COMPLETED, run.error
    assert [s.key for s in run.steps.order_by("seq")] == [
        "researcher:model",
        "researcher:search_reference",
        "researcher:model#1",
        "researcher:read_topic",
        "researcher:model#2",
    ]
    hits = run.steps.get(key="researcher:search_reference").output["value"]
    assert "context-managers" in {hit["topic"] for hit in hits}
    read = run.steps.get(key="researcher:read_topic").output["value"]
    assert read["topic"] == "context-managers" and "__enter__" in read["text"]
    # The local server answered with the structured output, built from what the tools returned.
    assert "Tool read_topic returned" in run.output["answer"] and run.output["topics"]
    assert run.output["model_requests"] == 3 and run.output["tool_calls"] == 2
    assert run.cost_usd > 0


# --- triage-agent (OpenAI Agents SDK, durable through run_agent) ---------------------------------------------


def test_triage_agent_hands_a_double_charge_to_billing_offline(llm, monkeypatch):
    from runs.testing import run_task

    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    run = run_task("triage-agent", {"message": "I was charged twice for order A-17, please refund me."})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["team"] == "billing"
    keys = [s.key for s in run.steps.order_by("seq")]
    assert keys[:3] == ["triage:model", "triage:handoff:billing", "billing:model"]
    assert {"billing:lookup_charges", "billing:refund_duplicate_charge"} <= set(keys)
    refund = run.steps.get(key="billing:refund_duplicate_charge").output
    assert refund == {"order": "A-17", "refunded": 39.0, "charges_refunded": 1}


def test_triage_agent_hands_a_parcel_question_to_shipping_offline(llm, monkeypatch):
    from runs.testing import run_task

    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    run = run_task("triage-agent", {"message": "Where is the parcel for order B-4?"})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output["team"] == "shipping"
    assert run.steps.get(key="shipping:track_parcel").output == {"order": "B-4", "parcel": "in transit, due Thursday"}
