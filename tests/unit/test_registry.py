"""The task registry: the project's agents folder is the package `dex_agents`, so `agents` stays free for the
OpenAI Agents SDK."""

from __future__ import annotations

import importlib
import sys

from django.conf import settings

from runs.sdk.registry import AGENTS_PACKAGE, registry


def test_it_loads_the_agents_folder_as_dex_agents():
    assert sys.modules[AGENTS_PACKAGE].__path__ == [str(settings.DEX_AGENTS_DIR)]
    saga = registry.get("booking-saga")
    assert saga.qualified_name == "dex_agents.booking_saga.booking_saga"
    # The examples import each other through that name.
    assert sys.modules["dex_agents.booking_saga"].booking_service is importlib.import_module(
        "dex_agents.booking_service"
    )


def test_it_leaves_the_name_agents_to_whoever_owns_it():
    """Dex never imports a module named `agents`, and the folder has no __init__.py: a regular package of that
    name (the OpenAI Agents SDK) wins over it, so an agent module can `import agents`."""
    assert not (settings.DEX_AGENTS_DIR / "__init__.py").exists()
    try:
        module = importlib.import_module("agents")
    except ImportError:
        return
    if getattr(module, "__file__", None):  # a regular package: the SDK, not the folder
        assert not module.__file__.startswith(str(settings.DEX_AGENTS_DIR))
