"""LLM cassettes for ctx.ai.infer: export a real run's exchanges, replay them with no provider call, and fail
with a readable diff when the run asks for something else."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from runs.ai.cassettes import CassetteMismatch
from runs.models import RunStatus
from runs.testing import run_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def llm(settings):
    from runs.ai.testserver import serve_in_thread

    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        yield server
    finally:
        server.stop()


def export(run, path) -> dict:
    err = StringIO()
    call_command("dex", "cassette", "export", str(run.pk), "-o", str(path), stderr=err)
    assert f"Wrote 3 exchange(s) of run {run.pk}" in err.getvalue()
    return json.loads(path.read_text())


def test_an_exported_run_replays_with_no_provider_call(llm, tmp_path):
    first = run_task("t-llm-chain", {"topic": "durable agents"})
    assert first.status == RunStatus.COMPLETED, first.error
    tape = export(first, tmp_path / "chain.json")
    assert [e["step"] for e in tape["exchanges"]] == ["plan", "draft", "final"]
    assert tape["exchanges"][0]["request"]["messages"] == [{"role": "user", "content": "plan durable agents"}]
    assert tape["exchanges"][2]["usage"]["model"] == "gpt-5-mini"
    llm.reset()

    replayed = run_task("t-llm-chain", {"topic": "durable agents"}, cassette=tmp_path / "chain.json")
    assert replayed.status == RunStatus.COMPLETED, replayed.error
    assert replayed.output == first.output
    assert llm.stats()["requests"] == 0  # nobody was asked, not even the response cache's provider
    usage = replayed.steps.get(key="final").meta["usage"]
    assert usage["cassette"] == "replayed" and usage["input_tokens"] > 0


def test_a_changed_prompt_fails_with_the_diff(llm, tmp_path):
    export(run_task("t-llm-chain", {"topic": "durable agents"}), tmp_path / "chain.json")
    llm.reset()
    with pytest.raises(CassetteMismatch) as failure:
        run_task("t-llm-chain", {"topic": "flaky agents"}, cassette=tmp_path / "chain.json")
    message = str(failure.value)
    assert "LLM request #1 (step 'plan')" in message
    assert '-      "content": "plan durable agents"' in message
    assert '+      "content": "plan flaky agents"' in message
    assert llm.stats()["requests"] == 0


def test_record_new_appends_what_the_cassette_lacks_through_the_provider(llm, tmp_path):
    path = tmp_path / "chain.json"
    export(run_task("t-llm-chain", {"topic": "durable agents"}), path)
    data = json.loads(path.read_text())
    data["exchanges"] = data["exchanges"][:2]
    path.write_text(json.dumps(data))
    llm.reset()

    with pytest.raises(CassetteMismatch, match="past the end of the cassette"):
        run_task("t-llm-chain", {"topic": "durable agents"}, cassette=path)
    assert llm.stats()["requests"] == 0

    run = run_task("t-llm-chain", {"topic": "durable agents"}, cassette=path, record="new")
    assert run.status == RunStatus.COMPLETED, run.error
    assert llm.stats()["requests"] == 1  # only the missing third exchange went to the provider
    assert [e["step"] for e in json.loads(path.read_text())["exchanges"]] == ["plan", "draft", "final"]
    assert run.steps.get(key="final").meta["usage"]["cassette"] == "recorded"

    llm.reset()
    again = run_task("t-llm-chain", {"topic": "durable agents"}, cassette=path)
    assert again.output == run.output and llm.stats()["requests"] == 0


def test_secrets_are_redacted_in_the_cassette(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("PARTNER_API_KEY", "partner-secret-value-123")
    from runs.redact import forget_cached_values

    forget_cached_values()
    run = run_task("t-llm-chain", {"topic": "with key partner-secret-value-123 and sk-abcdefghijklmnopqrstuvwx"})
    export(run, tmp_path / "chain.json")
    text = (tmp_path / "chain.json").read_text()
    assert "partner-secret-value-123" not in text and "sk-abcdefghijklmnopqrstuvwx" not in text
    assert "[redacted]" in text
    # The step kept the request redacted too: the database never held the secret for this.
    assert "partner-secret-value-123" not in json.dumps(run.steps.get(key="plan").meta)


def test_export_says_what_is_wrong(llm, tmp_path):
    with pytest.raises(CommandError, match="is not a run id"):
        call_command("dex", "cassette", "export", "nope", "-o", str(tmp_path / "x.json"))
    run = run_task("t-ten-steps", {"ledger": str(tmp_path / "ledger"), "steps": 1})
    with pytest.raises(CommandError, match="made no recorded LLM exchange"):
        call_command("dex", "cassette", "export", str(run.pk), "-o", str(tmp_path / "x.json"))


def test_a_missing_or_foreign_cassette_is_a_clear_error(llm, tmp_path):
    from runs.ai.cassettes import CassetteError

    with pytest.raises(CassetteError, match="no cassette at"):
        run_task("t-llm-chain", {"topic": "x"}, cassette=tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"interactions": []}')
    with pytest.raises(CassetteError, match="is not a Dex cassette"):
        run_task("t-llm-chain", {"topic": "x"}, cassette=tmp_path / "other.json")
