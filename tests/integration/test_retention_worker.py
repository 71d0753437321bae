"""Large outputs and retention across real processes: a Celery worker writes step outputs to the output storage
directory named in its environment, this process reads them back through the rows' references, and a real
scheduler applies DEX_RETENTION_DAYS, deleting the run with its stored outputs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from runs import services
from runs.models import Run, RunStatus, Step
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_worker_offloads_outputs_and_the_scheduler_prunes_them_with_the_run(processes, ledger, tmp_path, settings):
    outputs = tmp_path / "outputs"
    settings.STORAGES = {
        **settings.STORAGES,
        "dex_outputs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": outputs}},
    }
    storage_env = {"DEX_OUTPUT_DIR": str(outputs), "DEX_OUTPUT_INLINE_MAX_BYTES": "0"}  # every output offloaded
    processes.worker(**storage_env)
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger)})

    def done() -> Run | None:
        run.refresh_from_db()
        return run if run.is_terminal else None

    wait_for(done, what=f"run {run.id} to finish")
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"total": 55}
    assert list(run.steps.values_list("output", flat=True)) == list(range(1, 11))
    blobs = {p.name for p in (outputs / str(run.pk)).iterdir()}
    assert len(blobs) == 11  # ten step outputs and the run's

    Run.objects.filter(pk=run.pk).update(finished_at=timezone.now() - timedelta(days=31))
    processes.scheduler(DEX_RETENTION_DAYS="30", **storage_env)
    wait_for(lambda: not Run.objects.filter(pk=run.pk).exists(), what="the scheduler to prune the run")
    assert not Step.objects.filter(run_id=run.pk).exists()
    wait_for(lambda: not (outputs / str(run.pk)).exists(), what="its stored outputs to go")
    assert Path(outputs).is_dir()
