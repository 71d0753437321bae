"""Large step and run outputs live in the "dex_outputs" storage (a filesystem directory here), the rows keep a
small reference, and every reader — the engine's memoised replay, the API, the run page and its downloads,
a fork — sees the whole value."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from runs import engine, offload, services
from runs.models import ApiKey, Run, RunStatus, Step, StepStatus
from runs.ops.audit import Actor
from runs.sdk import Retry, task
from runs.testing import drive, run_task

pytestmark = pytest.mark.django_db

MEGABYTE = "x" * 1_000_000
CALLS: list[str] = []


@pytest.fixture(autouse=True)
def outputs_dir(tmp_path: Path, settings) -> Path:
    location = tmp_path / "outputs"
    settings.STORAGES = {
        **settings.STORAGES,
        "dex_outputs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": location}},
    }
    CALLS.clear()
    return location


def _big(tag: str) -> str:
    CALLS.append(tag)
    return MEGABYTE


def _flaky_once(tag: str) -> int:
    CALLS.append(tag)
    if CALLS.count(tag) == 1:
        raise RuntimeError("the first attempt fails")
    return 7


@task("u-offload-big", retry=Retry(attempts=2, initial=0.01))
def big_then_flaky(ctx) -> dict:
    text = ctx.step("big", _big, "big")
    extra = ctx.step("flaky", _flaky_once, "flaky")
    return {"length": len(text), "extra": extra, "sha": hashlib.sha256(text.encode()).hexdigest()}


@task("u-offload-fails", retry=Retry(attempts=1))
def big_then_fails(ctx) -> int:
    text = ctx.step("big", _big, "big")
    return ctx.step("flaky", _flaky_once, "flaky") + len(text)


@task("u-offload-small")
def small_steps(ctx) -> list:
    return [ctx.step(f"s{i}", lambda i=i: {"i": i}) for i in range(3)]


@task("u-offload-run-output")
def big_run_output(ctx) -> dict:
    return {"text": MEGABYTE, "n": ctx.step("n", lambda: 1)}


@task("u-offload-marker")
def marker_lookalike(ctx) -> dict:
    return ctx.step("looks-like-a-reference", lambda: {"$dex_blob": "not/a/key.json", "size": 1})


def _raw_output(step: Step) -> tuple[int, dict]:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_column_size(output), output::text FROM runs_step WHERE id = %s", [step.pk])
        size, text = cur.fetchone()
    return size, json.loads(text)


def test_a_megabyte_step_output_is_stored_in_the_storage_and_the_row_stays_small(outputs_dir: Path):
    run = run_task(big_then_flaky, {})
    assert run.status == RunStatus.COMPLETED

    step = run.steps.get(key="big")
    size, raw = _raw_output(step)
    assert size < 300
    digest = hashlib.sha256(json.dumps(MEGABYTE).encode()).hexdigest()
    assert raw == {"$dex_blob": f"{run.pk}/{digest}.json", "size": 1_000_002, "sha256": digest}
    blob = outputs_dir / str(run.pk) / f"{digest}.json"
    assert json.loads(blob.read_text()) == MEGABYTE
    assert step.output == MEGABYTE  # the ORM reads it back whole
    # The step's retry back-off re-executed the run: "big" was replayed from the stored value, not re-run.
    assert CALLS == ["big", "flaky", "flaky"]
    assert run.output == {"length": 1_000_000, "extra": 7, "sha": hashlib.sha256(MEGABYTE.encode()).hexdigest()}


def test_a_retry_after_failure_reads_the_memoised_value_from_the_storage():
    run = run_task(big_then_fails, {})
    assert run.status == RunStatus.FAILED
    assert CALLS == ["big", "flaky"]

    assert engine.run_retry_from_failed_step(run.pk)
    run = drive(run)

    assert run.status == RunStatus.COMPLETED
    assert CALLS == ["big", "flaky", "flaky"]  # "big" never ran again
    assert run.output == 7 + 1_000_000


def test_the_api_the_run_page_and_the_downloads_return_the_whole_value():
    run = run_task(big_then_flaky, {})
    step = run.steps.get(key="big")
    _key, secret = ApiKey.generate(name="offload")

    body = Client(headers={"authorization": f"Bearer {secret}"}).get(f"/api/runs/{run.pk}").json()
    assert {s["key"]: s["output"] for s in body["steps"]}["big"] == MEGABYTE

    viewer = Client()
    viewer.force_login(get_user_model().objects.create_user("viewer", password="pw-viewer-123"))
    html = viewer.get(f"/runs/{run.pk}/?step=big").content.decode()  # the step inspector shows its output
    assert "&quot;xxxxxxxxxx" in html  # a preview of the value itself, not of its reference
    assert "$dex_blob" not in html
    assert f"/runs/{run.pk}/steps/{step.pk}/output.json" in html
    download = viewer.get(f"/runs/{run.pk}/steps/{step.pk}/output.json")
    assert json.loads(download.content) == MEGABYTE


def test_small_outputs_never_touch_the_storage(outputs_dir: Path):
    run = run_task(small_steps, {})
    assert run.output == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert not outputs_dir.exists()
    assert _raw_output(run.steps.get(key="s1"))[1] == {"i": 1}


def test_a_large_run_output_is_offloaded_too():
    run = run_task(big_run_output, {})
    with connection.cursor() as cur:
        cur.execute("SELECT pg_column_size(output) FROM runs_run WHERE id = %s", [run.pk])
        assert cur.fetchone()[0] < 300
    assert Run.objects.get(pk=run.pk).output == {"text": MEGABYTE, "n": 1}


def test_a_value_that_looks_like_a_reference_comes_back_as_it_was():
    run = run_task(marker_lookalike, {})
    assert run.output == {"$dex_blob": "not/a/key.json", "size": 1}
    assert run.steps.get().output == {"$dex_blob": "not/a/key.json", "size": 1}


def test_a_fork_has_its_own_copy_so_pruning_the_original_keeps_it_whole(outputs_dir: Path):
    run = run_task(big_then_flaky, {})
    fork = services.run_fork(run=run, step_key="flaky", by=Actor.system("tests"))
    copied = fork.steps.get(key="big")
    assert _raw_output(copied)[1]["$dex_blob"].startswith(f"{fork.pk}/")
    Run.objects.filter(pk=run.pk).delete()
    offload.delete_run_blobs([run.pk])
    assert not (outputs_dir / str(run.pk)).exists()
    assert Step.objects.get(pk=copied.pk).output == MEGABYTE


def test_a_storage_that_cant_be_written_fails_the_step_attempt_readably(tmp_path: Path, settings):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    settings.STORAGES = {
        **settings.STORAGES,
        "dex_outputs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": not_a_dir}},
    }
    run = run_task(big_then_fails, {})
    assert run.status == RunStatus.FAILED
    step = run.steps.get(key="big")
    assert step.status == StepStatus.FAILED
    assert "could not write a 1,000,002-byte output to the 'dex_outputs' storage" in step.error["message"]
    assert step.output is None


def test_a_missing_blob_is_a_clear_error_not_a_wrong_value(outputs_dir: Path):
    run = run_task(big_then_flaky, {})
    for blob in (outputs_dir / str(run.pk)).iterdir():
        blob.unlink()
    with pytest.raises(offload.OutputStorageError, match="can't be read from the 'dex_outputs' storage"):
        Step.objects.get(run=run, key="big")


def test_a_retry_whose_recorded_output_is_gone_fails_the_run_readably(outputs_dir: Path):
    run = run_task(big_then_fails, {})
    for blob in (outputs_dir / str(run.pk)).iterdir():
        blob.unlink()
    assert engine.run_retry_from_failed_step(run.pk)
    run = drive(run)
    assert run.status == RunStatus.FAILED
    assert run.error["type"] == "OutputStorageError"
    assert "can't be read from the 'dex_outputs' storage" in run.error["message"]
    assert CALLS == ["big", "flaky"]  # nothing ran on a wrong value
