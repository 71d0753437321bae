"""The agent frameworks are optional: without one, its integration (and the example using it) says which
extra of Dex to install."""

from __future__ import annotations

import importlib
import sys

import pytest

from runs.integrations import MissingExtra
from runs.models import RunStatus


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("runs.integrations.pydantic_ai", "pydantic_ai", "pydantic-ai"),
        ("runs.integrations.openai_agents", "agents", "openai-agents"),
    ],
)
def test_an_integration_without_its_framework_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)  # what an uninstalled package looks like to `import`
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingExtra) as missing:
        importlib.import_module(module)
    assert f"install Dex's {extra!r} extra" in str(missing.value)
    assert f"uv sync --extra {extra}" in str(missing.value)
    assert isinstance(missing.value, ImportError)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("task_id", "framework", "integration", "extra"),
    [
        ("pydantic-research-agent", "pydantic_ai", "runs.integrations.pydantic_ai", "pydantic-ai"),
        ("triage-agent", "agents", "runs.integrations.openai_agents", "openai-agents"),
    ],
)
def test_an_example_without_its_framework_fails_its_run_saying_so(monkeypatch, task_id, framework, integration, extra):
    from runs.testing import run_task

    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, integration, raising=False)
    run = run_task(task_id, {})
    assert run.status == RunStatus.FAILED
    assert f"install Dex's {extra!r} extra" in run.error["message"]
    assert run.steps.count() == 0  # failed before any step: nothing to retry
