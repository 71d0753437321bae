"""The bench's peers (Restate, Temporal) are installed on first use and skipped, with the reason, when no
registry answers. Nothing is downloaded here: every package index is pointed at nothing and every cache is
off, as on a machine whose registries can't be reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import peerkit


def test_an_unreachable_registry_skips_every_peer_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    for name, value in {
        "UV_OFFLINE": "1",  # uv: no network at all, and
        "UV_NO_CACHE": "1",  # nothing from its cache either
        "PIP_NO_INDEX": "1",  # pip (where uv isn't installed): no index,
        "PIP_FIND_LINKS": str(empty),  # and no local wheels
        "npm_config_offline": "true",
        "npm_config_cache": str(tmp_path / "npm-cache"),
    }.items():
        monkeypatch.setenv(name, value)

    installed = peerkit.install(tmp_path / "peers")

    assert set(installed.skipped) == set(peerkit.PEERS)
    assert all("install" in why for why in installed.skipped.values()), installed.skipped
    assert installed.restate_server is None and installed.temporal is None
    # A later run tries again: nothing marks the half-made cache as installed.
    assert not (tmp_path / "peers" / "venv" / "dex-bench-packages.json").exists()


@pytest.mark.parametrize(
    ("setting", "sizes", "skipped"), [("off", "quick", True), ("", "tiny", True), ("", "quick", False)]
)
def test_peers_are_off_at_tiny_sizes_and_when_switched_off(
    setting: str, sizes: str, skipped: bool, monkeypatch
) -> None:
    from bench.harness import QUICK, TINY

    monkeypatch.setenv("DEX_BENCH_PEERS", setting)
    env = type("Env", (), {"sizes": TINY if sizes == "tiny" else QUICK})()
    assert (peerkit.disabled_reason(env) is not None) is skipped
