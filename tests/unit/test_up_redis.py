"""``cardvault up --redis-url``: the vault's settings say backend "redis" with the URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from cardvault.cli.up import _use_redis
from cardvault.cli.zones import prepare
from cardvault.config import load_settings
from cardvault.vault.settings import VaultSettings


def test_redis_url_goes_into_the_vaults_limits(tmp_path: Path) -> None:
    info = prepare(
        tmp_path / "state", vault_port=18443, redirect_port=18080, admin_port=18447,
        keyservice_port=18444,
    )  # fmt: skip
    config = Path(info["vault"]["config"])
    assert load_settings(VaultSettings, config, env={}).limits.backend == "memory"
    _use_redis(str(config), "redis://127.0.0.1:6379/3")
    limits = load_settings(VaultSettings, config, env={}).limits
    assert limits.backend == "redis"
    assert limits.redis_url is not None
    assert limits.redis_url.reveal() == "redis://127.0.0.1:6379/3"
    assert config.stat().st_mode & 0o077 == 0
    with pytest.raises(typer.Exit):
        _use_redis(str(config), "http://127.0.0.1:6379/3")
