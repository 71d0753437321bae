"""Production deploy: the settings docker-compose.yml gives Dex pass `manage.py check --deploy` with no warnings,
a missing required variable is a clear error naming it, and the compose file runs exactly the commands the
README's "Deploy" section documents."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys

import pytest
import yaml
from django.conf import settings
from django.db import connection

from tests.conftest import ROOT, database_url

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
README = (ROOT / "README.md").read_text()
DEPLOY = README[README.index("## Deploy\n") : README.index("\n## ", README.index("## Deploy\n") + 1)]
SCALE_OUT = README[README.index("## Scale out\n") : README.index("\n## ", README.index("## Scale out\n") + 1)]
REQUIRED = ("DEX_SECRET_KEY", "DEX_ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL")


def resolve(value: str) -> str:
    """Compose's `${VAR:-default}` as a fresh `.env` gives it: the default."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(value))


def production_env(**overrides: str) -> dict[str, str]:
    """The web service's environment from the compose file, pointed at the test database and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEX_", "DJANGO_"))}
    for name, value in COMPOSE["services"]["web"]["environment"].items():
        env[name] = resolve(value)
    env.update(
        DEX_SECRET_KEY=secrets.token_urlsafe(50),
        DEX_ALLOWED_HOSTS="dex.example.com",
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.django_db
def test_check_deploy_is_clean_under_the_compose_files_production_settings():
    result = manage(production_env(), "check", "--deploy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "System check identified no issues (0 silenced)."
    assert "WARNING" not in result.stderr


@pytest.mark.django_db
@pytest.mark.parametrize("missing", REQUIRED)
def test_a_missing_required_variable_in_production_is_a_clear_error(missing: str):
    env = production_env()
    del env[missing]
    result = manage(env, "check", "--deploy")
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {missing} must be set when DEX_ENV=production" in result.stderr


@pytest.mark.django_db
def test_debug_is_refused_in_production():
    result = manage(production_env(DEX_DEBUG="true"), "check")
    assert "DEX_DEBUG=true is not allowed when DEX_ENV=production" in result.stderr


def test_s3_output_storage_is_configured_from_the_environment():
    script = (
        "from django.core.files.storage import storages; "
        "s = storages['dex_outputs']; print(type(s).__name__, s.bucket_name, s.location, s.endpoint_url)"
    )
    env = {
        **os.environ,
        # Given, so settings don't look for the embedded servers.
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_SETTINGS_MODULE": "dexweb.settings",
        "DEX_OUTPUT_STORAGE": "s3",
        "DEX_S3_BUCKET": "dex-blobs",
        "DEX_S3_ENDPOINT_URL": "http://minio.internal:9000",
    }
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["S3Storage", "dex-blobs", "dex-outputs", "http://minio.internal:9000"], out.stderr
    del env["DEX_S3_BUCKET"]
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "DEX_S3_BUCKET must be set when DEX_OUTPUT_STORAGE=s3" in out.stderr


def test_the_compose_services_run_the_commands_the_deploy_section_documents():
    services = COMPOSE["services"]
    commands = {name: resolve(" ".join(s["command"])) for name, s in services.items() if "command" in s}
    assert set(commands) == {"redis", "migrate", "web", "worker", "scheduler"}
    for name, command in commands.items():
        assert re.search(rf"^\| {name} \| `{re.escape(command)}`", DEPLOY, re.M), (name, command)
    assert "`postgres:16`" in DEPLOY and services["postgres"]["image"] == "postgres:16"
    assert "docker compose up -d --scale worker=4" in SCALE_OUT
    assert f"`{commands['worker']}`" in SCALE_OUT
    # The image's default command is the web service's.
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)
    assert " ".join(yaml.safe_load(cmd)) == commands["web"]


def test_the_compose_file_is_production_shaped():
    services = COMPOSE["services"]
    for name in ("postgres", "redis", "web", "worker", "scheduler"):
        assert "test" in services[name]["healthcheck"], name
    for name in ("web", "worker", "scheduler"):
        env = services[name]["environment"]
        assert env["DEX_ENV"] == "production"
        assert set(REQUIRED) <= set(env)
        assert "outputs:/data/outputs" in services[name]["volumes"]
        assert env["DEX_OUTPUT_DIR"] == "/data/outputs"
    # `--scale worker=N` needs a worker with no fixed name or host port.
    assert not {"container_name", "ports"} & set(services["worker"])
    assert {"pgdata", "redisdata", "outputs"} <= set(COMPOSE["volumes"])
    assert "mkdir -p /data/outputs && chown dex:dex /data/outputs" in (ROOT / "Dockerfile").read_text()
