"""Which code executes a run (DESIGN §2, `ctx.patched`).

A run records the version it started on and the version of every later execution that differs. The version is
`DEX_CODE_VERSION` when the deploy sets it, else the git revision of the checkout the process runs from, else a
hash of the task's module source — so a deploy that changes a task's code changes its version even without git.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import subprocess
import sys

from django.conf import settings

from runs.sdk.registry import registry


@functools.cache
def deploy_version() -> str:
    """DEX_CODE_VERSION, else the checkout's git revision (12 characters), else ""."""
    if settings.DEX_CODE_VERSION:
        return settings.DEX_CODE_VERSION[:100]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()[:100]


def source_version(fn: object) -> str:
    """A hash of the module source a task function is defined in (its code, as deployed)."""
    module = sys.modules.get(getattr(fn, "__module__", ""))
    try:
        source = inspect.getsource(module) if module is not None else inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""
    return "src-" + hashlib.sha256(source.encode()).hexdigest()[:12]


def task_versions() -> dict[str, str]:
    """{task id: version} for the tasks of this process, when no deploy-wide version is known."""
    if deploy_version():
        return {}
    return _source_versions(len(registry))


@functools.cache
def _source_versions(_task_count: int) -> dict[str, str]:
    # Keyed by the number of tasks: a test that registers a task later gets its version too.
    return {task.id: source_version(task.fn) for task in registry.all()}
