"""Code shipped while runs are in flight (DESIGN §2, `ctx.patched`): a run parked under the old code resumes
down its old path after the new code is deployed, while new runs take the new path; every run records the code
version it started on and each later execution's."""

from __future__ import annotations

import pytest
from django.test import Client

from runs import services
from runs.models import ApiKey, RunStatus
from tests.agents import ledger_lines
from tests.conftest import Processes, logged_in, persona, wait_for
from tests.integration.test_worker import finished
from tests.versions import v1  # noqa: F401  (the test process knows the task as the first deploy did)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def deploy(processes: Processes, version: str, module: str, name: str):
    modules = f"tests.agents,tests.guarantee_agents,tests.versions.{module}"
    return processes.worker(name=name, DEX_CODE_VERSION=version, DEX_AGENT_MODULES=modules)


def test_a_parked_run_keeps_its_old_path_after_a_patch_while_new_runs_take_the_new_one(processes, tmp_path):
    processes.scheduler()
    old_worker = deploy(processes, "v1", "v1", "old")
    old_ledger, new_ledger = tmp_path / "old", tmp_path / "new"
    old, _ = services.run_trigger(task_id="g-versioned", payload={"ledger": str(old_ledger), "seconds": 3})
    wait_for(lambda: old.refresh_from_db() or old.status == RunStatus.WAITING, what="the old run to park")
    old_worker.stop()

    deploy(processes, "v2", "v2", "new")
    new, _ = services.run_trigger(task_id="g-versioned", payload={"ledger": str(new_ledger), "seconds": 0.2})
    finished(old, timeout=60)
    finished(new, timeout=60)

    assert (old.status, new.status) == (RunStatus.COMPLETED, RunStatus.COMPLETED), (old.error, new.error)
    assert ledger_lines(old_ledger) == ["one", "two"]  # resumed under v2, down the path it started on
    assert ledger_lines(new_ledger) == ["one", "extra", "two"]
    assert old.code_version == "v1" and [e["version"] for e in old.execution_versions] == ["v1", "v2"]
    assert new.code_version == "v2" and [e["version"] for e in new.execution_versions] == ["v2"]
    assert list(new.steps.values_list("key", flat=True)) == ["one", "patch:extra-step", "extra", "nap", "two"]

    # The API shows the version and filters by it; so does the run list.
    _key, secret = ApiKey.generate(name="versions")
    api = Client(headers={"authorization": f"Bearer {secret}"})
    assert api.get(f"/api/runs/{old.pk}").json()["code_version"] == "v1"
    listed = api.get("/api/runs", {"version": "v1"}).json()
    assert [item["id"] for item in listed["items"]] == [str(old.pk)]
    page = logged_in(persona("viewer")).get("/", {"version": "v2"}).content.decode()
    assert str(new.pk) in page and str(old.pk) not in page
