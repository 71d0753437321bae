"""`manage.py dex`: the operator's CLI over the services — what it prints, what it records in the audit log,
and a clear error (exit status 1) for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone

from runs.engine import waitpoint_create
from runs.models import AuditEntry, Event, Run, RunStatus, WaitpointKind
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db


def dex(*args: str) -> str:
    out = StringIO()
    call_command("dex", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# --- trigger ------------------------------------------------------------------------------------------------


def test_trigger_starts_a_run_and_records_it(tmp_path: Path) -> None:
    get_user_model().objects.create_user("alice")
    out = dex("--user", "alice", "trigger", "t-typed", "--payload", '{"name": "x", "count": 3}', "--tag", "cli")
    run = Run.objects.get()
    assert out.strip() == str(run.pk)
    assert (run.task_id, run.payload["count"], run.tags, run.status) == ("t-typed", 3, ["cli"], RunStatus.QUEUED)
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.username, entry.run_ids) == ("trigger", "alice", [run.pk])
    assert entry.detail["via"] == "cli" and entry.detail["task"] == "t-typed"


def test_trigger_reads_the_payload_from_a_file_and_honours_the_idempotency_key(tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"name": "from-file"}))
    first = dex("trigger", "t-typed", "--payload", f"@{payload}", "--idempotency-key", "k1")
    again = dex("trigger", "t-typed", "--payload", f"@{payload}", "--idempotency-key", "k1")
    assert first == again and Run.objects.get().payload["name"] == "from-file"


def test_trigger_wait_fails_when_the_run_did_not_complete() -> None:
    """(The happy path of --wait, with a real worker, is in tests/integration/test_alerts_worker.py.)"""
    from runs.management.commands.dex import Command

    run = Run.objects.create(
        task_id="t-typed", status=RunStatus.FAILED, error={"type": "ValueError", "message": "boom"}
    )
    with pytest.raises(CommandError, match=f"run {run.pk} ended failed: ValueError: boom"):
        Command(stdout=StringIO())._wait(run, timeout=5)
    run.status = RunStatus.QUEUED
    run.save(update_fields=["status"])
    with pytest.raises(CommandError, match="is still queued after 0.3s"):
        Command(stdout=StringIO())._wait(run, timeout=0.3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["trigger", "no-such-task"], "unknown task 'no-such-task'; known tasks: "),
        (["trigger", "t-typed", "--payload", "{nope"], "--payload is not valid JSON: Expecting property name"),
        (["trigger", "t-typed", "--payload", "[1, 2]"], "--payload must be a JSON object"),
        (["trigger", "t-typed", "--payload", "@/nonexistent/p.json"], "--payload: cannot read /nonexistent/p.json"),
        (["trigger", "t-typed", "--payload", '{"count": "many"}'], "invalid payload for t-typed: name: Field required"),
        (["trigger", "t-typed", "--payload", '{"name": "x"}', "--delay", "-1"], "--delay must not be negative"),
        (["trigger", "t-typed", "--payload", '{"name": "x"}', "--delay", "1e300"], "--delay must be at most"),
        (["trigger", "t-typed", "--payload", '{"name": "x"}', "--delay", "nan"], "--delay must be at most"),
        (["--user", "nobody", "trigger", "t-typed"], "no user 'nobody'"),
        (["runs", "--status", "exploded"], "unknown status 'exploded'; choose from delayed, queued"),
        (["runs", "--limit", "0"], "--limit must be between 1 and 1000"),
        (["cancel", "not-a-uuid"], "'not-a-uuid' is not a run id"),
        (["retry", "01a20ee7-abd7-71bf-b193-9bb3daf22d65"], "no run 01a20ee7-abd7-71bf-b193-9bb3daf22d65"),
        (["events", "send", "order.paid", "--data", "nope"], "--data is not valid JSON"),
        (["events", "send", "  "], "the event name must not be empty"),
        # Text Postgres can't store: a NUL (through call_command, or a JSON escape) or a lone surrogate (an
        # argument that wasn't UTF-8, as Python decodes argv).
        (["trigger", "t-typed", "--payload", '{"name": "a\\u0000"}'], "--payload: name: text can't contain NUL"),
        (["trigger", "t-typed", "--payload", '{"name": "x"}', "--tag", "a\x00"], "--tag: text can't contain NUL"),
        (["trigger", "t-typed", "--idempotency-key", "k\udcff"], "--idempotency-key: text must be valid Unicode"),
        (["events", "send", "order\x00paid"], "--name: text can't contain NUL"),
        (["events", "send", "ok", "--data", '{"k": "\\ud800"}'], "--data: k: text must be valid Unicode"),
        (["cancel", "\x00"], "--run-id: text can't contain NUL"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        dex(*args)
    assert message in str(excinfo.value)
    assert not Run.objects.exists() and not Event.objects.exists() and not AuditEntry.objects.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--name", "ci\x00"], "--name: text can't contain NUL"),
        (["revoke", "dex_\x00"], "--key: text can't contain NUL"),
    ],
)
def test_apikey_refuses_text_postgres_cannot_store(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("apikey", *args, stdout=StringIO(), stderr=StringIO())


def test_errors_exit_non_zero_from_the_shell(dex_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "dex", "trigger", "no-such-task"],
        cwd=ROOT,
        env=dex_env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "unknown task 'no-such-task'" in result.stderr


# --- runs, cancel, retry ------------------------------------------------------------------------------------


def test_runs_lists_newest_first_with_filters() -> None:
    old = Run.objects.create(task_id="t-typed", status=RunStatus.FAILED)
    new = Run.objects.create(task_id="t-typed", status=RunStatus.COMPLETED)
    other = Run.objects.create(task_id="t-sleep", status=RunStatus.FAILED)
    lines = dex("runs").splitlines()
    assert lines[0].split()[:3] == ["ID", "TASK", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == [str(other.pk), str(new.pk), str(old.pk)]
    assert [line.split()[0] for line in dex("runs", "--status", "failed", "--task", "t-typed").splitlines()[1:]] == [
        str(old.pk)
    ]
    assert len(dex("runs", "--limit", "1").splitlines()) == 2
    assert dex("runs", "--task", "nothing-here").strip() == "No runs match."


def test_cancel_and_retry_go_through_the_services_and_the_audit_log() -> None:
    queued = Run.objects.create(task_id="t-typed", status=RunStatus.QUEUED)
    assert "Cancel requested" in dex("cancel", str(queued.pk))
    queued.refresh_from_db()
    assert queued.status == RunStatus.CANCELED
    with pytest.raises(CommandError, match="has already finished"):
        dex("cancel", str(queued.pk))

    failed = Run.objects.create(
        task_id="t-typed", status=RunStatus.FAILED, finished_at=timezone.now(), error={"message": "x"}
    )
    assert "Retrying run" in dex("retry", str(failed.pk))
    failed.refresh_from_db()
    assert failed.status == RunStatus.QUEUED
    with pytest.raises(CommandError, match="only a failed, timed-out or canceled run can be retried"):
        dex("retry", str(failed.pk))
    assert list(AuditEntry.objects.order_by("id").values_list("action", flat=True)) == ["cancel", "retry"]


# --- events -------------------------------------------------------------------------------------------------


def test_events_send_resumes_a_waiting_run_once_per_id_and_lists_it() -> None:
    run = Run.objects.create(task_id="t-wait-event", status=RunStatus.WAITING)
    waitpoint_create(
        run_id=run.pk, step_key="review", kind=WaitpointKind.EVENT, event_name="report.reviewed", timeout_at=None
    )
    out = dex("events", "send", "report.reviewed", "--data", '{"ok": true}', "--id", "evt-1")
    assert "Sent report.reviewed" in out and "resumed 1 run(s)" in out
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    assert "was already received" in dex("events", "send", "report.reviewed", "--id", "evt-1")
    assert Event.objects.count() == 1

    listing = dex("events", "list").splitlines()
    assert listing[0].split()[:2] == ["ID", "NAME"]
    assert "report.reviewed" in listing[1] and listing[1].rstrip().endswith("evt-1")
    assert dex("events", "list", "--name", "other").strip() == "No events match."
    entries: list[Any] = list(AuditEntry.objects.values_list("action", "run_ids"))
    assert entries[0] == ("event_send", [run.pk])
