"""The task registry and its discovery.

Tasks come from the project's agents folder (`DEX_AGENTS_DIR`, by default `agents/` beside manage.py), from
any installed app's `agents.py`, and from the modules named in `DEX_AGENT_MODULES`. The same registry serves the
worker, the API and the dashboard, so a task a worker can run is a task the API accepts.

The agents folder is loaded by path as the package `dex_agents` (an agent module imports another one as
`from dex_agents import booking_service`), never as `agents`: that name belongs to the OpenAI Agents SDK, which
an agent module may import.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pkgutil
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

AGENTS_PACKAGE = "dex_agents"


class RegisteredTask(Protocol):
    """What the registry needs of a task (runs.sdk.Task; a Protocol, so the registry sits below the SDK)."""

    id: str

    @property
    def qualified_name(self) -> str: ...


class UnknownTask(LookupError):
    def __init__(self, task_id: str):
        super().__init__(f"no task named {task_id!r} is registered")
        self.task_id = task_id


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._discovered = False

    def register(self, task: RegisteredTask) -> None:
        with self._lock:
            existing = self._tasks.get(task.id)
            # Re-importing the same module (autoreload, tests) re-registers the same function: allowed.
            if existing is not None and existing.qualified_name != task.qualified_name:
                raise ValueError(
                    f"task id {task.id!r} is used twice: by {existing.qualified_name} and {task.qualified_name}"
                )
            self._tasks[task.id] = task

    def unregister(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def get(self, task_id: str) -> Any:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTask(task_id) from None

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks

    def all(self) -> list[Any]:
        return sorted(self._tasks.values(), key=lambda t: t.id)

    def autodiscover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        from django.conf import settings
        from django.utils.module_loading import autodiscover_modules

        package = load_agents_package(Path(settings.DEX_AGENTS_DIR))
        if package is not None:
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_") and info.name != "tests":
                    importlib.import_module(f"{AGENTS_PACKAGE}.{info.name}")
        autodiscover_modules("agents")
        for dotted in settings.DEX_AGENT_MODULES:
            importlib.import_module(dotted)


def load_agents_package(folder: Path) -> Any:
    """Make `folder` importable as the package `dex_agents` (once); None when there is no such folder."""
    if AGENTS_PACKAGE in sys.modules:
        return sys.modules[AGENTS_PACKAGE]
    if not folder.is_dir():
        return None
    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(AGENTS_PACKAGE, init, submodule_search_locations=[str(folder)])
    else:
        spec = importlib.machinery.ModuleSpec(AGENTS_PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[AGENTS_PACKAGE] = package
    if spec.loader is not None:
        spec.loader.exec_module(package)
    return package


registry = Registry()
