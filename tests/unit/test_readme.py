"""The README, .ci/run and docker-compose.yml say the same, true things: the two commands at the top, commands
that exist, and a compose file that runs the processes the README documents."""

from __future__ import annotations

import re

import yaml
from django.core.management import get_commands

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
CODE_BLOCKS = re.findall(r"```(?:bash|sh|console)\n(.*?)```", README, re.S)
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PRODUCT_COMMANDS = {  # compose service → what its command must contain; the README's processes table names them
    "web": "dexweb.asgi:application",
    "worker": "celery -A dexweb worker",
    "scheduler": "python manage.py scheduler",
    "migrate": "python manage.py migrate",
}


def shell_lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_it_opens_with_the_run_command_then_the_test_command():
    assert shell_lines(CODE_BLOCKS[0]) == ["python -m pip install uv && uv run manage.py dev"]
    assert shell_lines(CODE_BLOCKS[1]) == ["uv run pytest"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line for line in shell_lines((ROOT / ".ci" / "run").read_text()) if not line.startswith("#")]
    assert ci[0] == "set -euo pipefail"
    assert ci[-1] == shell_lines(CODE_BLOCKS[1])[0]


def test_every_manage_py_command_in_the_readme_and_compose_exists():
    compose_commands = [" ".join(s["command"]) for s in COMPOSE["services"].values() if "command" in s]
    named = set(re.findall(r"manage\.py (\w+)", "\n".join(CODE_BLOCKS + compose_commands)))
    named |= set(re.findall(r"`(?:python |uv run )?manage\.py (\w+)", README))
    assert {"dev", "apikey", "embedded", "scheduler", "migrate"} <= named
    assert named <= set(get_commands()), f"not a manage.py command: {named - set(get_commands())}"


def test_the_compose_file_runs_the_processes_the_readme_documents():
    services = COMPOSE["services"]
    assert {"postgres", "redis", "migrate", "web", "worker", "scheduler"} <= set(services)
    for name, expected in PRODUCT_COMMANDS.items():
        assert expected in " ".join(services[name]["command"]), name
    assert "`daphne -b 127.0.0.1 -p 8000 dexweb.asgi:application`" in README
    assert "`celery -A dexweb worker -c 2 -Q dex -l info`" in README
    assert "`python manage.py scheduler`" in README
    for name in ("postgres", "redis", "web", "worker", "scheduler"):
        assert "healthcheck" in services[name], name
    # `--scale worker=N` needs a worker with no fixed name or host port.
    assert not {"container_name", "ports"} & set(services["worker"])
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "worker", "scheduler"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DEX_SECRET_KEY"} <= set(env)
        assert env["DEX_DEBUG"] == "false"
    assert {"pgdata", "redisdata"} <= set(COMPOSE["volumes"])
