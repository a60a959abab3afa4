"""What a vault worker is told by its parent, and what it makes of its settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cardvault.config import load_settings
from cardvault.errors import ConfigurationError
from cardvault.vault.settings import VaultSettings
from cardvault.vault.workers import WorkerSpec, check_workers, worker_replica

BASE = {
    "CARDVAULT_SERVER_CERT_FILE": "/etc/v/cert.pem",
    "CARDVAULT_SERVER_KEY_FILE": "/etc/v/key.pem",
}


def settings(**env: str) -> VaultSettings:
    return load_settings(VaultSettings, env={**BASE, **env})


def test_a_spec_goes_through_the_command_line_unchanged() -> None:
    spec = WorkerSpec(1, 3, {"public": 3, "redirect": 4, "admin": 5})
    assert spec.encode() == "1/3:admin=5,public=3,redirect=4"
    assert WorkerSpec.parse(spec.encode()) == spec
    assert WorkerSpec.parse("0/2:") == WorkerSpec(0, 2, {})
    for bad in ("", "x", "2/2:public=3", "1/2:public", "1/2:public=x", "-1/2:"):
        with pytest.raises(ConfigurationError):
            WorkerSpec.parse(bad)


def test_each_worker_gets_its_replica_name_and_audit_log(tmp_path: Path) -> None:
    s = settings(
        CARDVAULT_STORE_URL="postgresql://vault@db/vault",
        CARDVAULT_AUDIT_DIRECTORY=str(tmp_path / "audit"),
        CARDVAULT_STORE_REPLICA="vault-1",
    )
    w1 = WorkerSpec(1, 2).settings(s)
    assert w1.store.replica == "vault-1/w1"
    assert w1.audit.directory == tmp_path / "audit" / "w1"
    # The administration log stays the vault's.
    assert w1.audit.admin_directory == tmp_path / "audit-admin"
    assert s.store.replica == "vault-1"  # the settings given are not changed
    unnamed = settings(CARDVAULT_STORE_URL="postgresql://vault@db/vault")
    assert worker_replica(unnamed, 0) == f"{socket.gethostname()}/w0"


def test_several_workers_need_postgresql() -> None:
    check_workers(settings(CARDVAULT_STORE_URL="sqlite:///var/v.db"))  # one: fine
    check_workers(
        settings(CARDVAULT_STORE_URL="postgresql://vault@db/v", CARDVAULT_SERVER_WORKERS="4")
    )
    with pytest.raises(ConfigurationError, match="needs a PostgreSQL store"):
        check_workers(
            settings(CARDVAULT_STORE_URL="sqlite:///var/v.db", CARDVAULT_SERVER_WORKERS="2")
        )
    with pytest.raises(ConfigurationError, match="at least 1"):
        check_workers(settings(CARDVAULT_SERVER_WORKERS="0"))
