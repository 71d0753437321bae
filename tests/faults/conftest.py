"""Fixtures of the fault suite: a cluster of real Dex processes on the test database, and private Redis /
Postgres servers a test may stop and restart (never the shared embedded ones: other sessions use those)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.faultkit  # noqa: F401  (registers the fault tasks in this process)
from bench.faultkit import Cluster, PrivatePostgres, PrivateRedis
from runs.ops.audit import Actor
from tests.conftest import SESSION


@pytest.fixture
def cluster(dex_env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    procs = Cluster(dex_env, tmp_path, tag=SESSION)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def api_secret() -> str:
    from runs import services

    _key, secret = services.apikey_create(name="faults", by=Actor.system("tests"))
    return secret
