"""The task registry and its discovery.

Tasks come from every module of this `agents` package, from any installed app's `agents.py`, and from the
modules named in `DEX_AGENT_MODULES`. The same registry serves the worker, the API and the dashboard, so a
task a worker can run is a task the API accepts.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runs.sdk import Task


class UnknownTask(LookupError):
    def __init__(self, task_id: str):
        super().__init__(f"no task named {task_id!r} is registered")
        self.task_id = task_id


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._discovered = False

    def register(self, task: Task) -> None:
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

    def get(self, task_id: str) -> Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTask(task_id) from None

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks

    def all(self) -> list[Task]:
        return sorted(self._tasks.values(), key=lambda t: t.id)

    def autodiscover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        from django.conf import settings
        from django.utils.module_loading import autodiscover_modules

        import agents

        for info in pkgutil.iter_modules(agents.__path__):
            if info.name not in ("registry", "apps", "tests") and not info.name.startswith("_"):
                importlib.import_module(f"agents.{info.name}")
        autodiscover_modules("agents")
        for dotted in settings.DEX_AGENT_MODULES:
            importlib.import_module(dotted)


registry = Registry()
