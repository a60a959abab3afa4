"""End-to-end fixtures: the vault as a real process on real TLS listeners."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Pki, cardvault_process, free_ports, wait_for_port


@dataclass
class VaultProcess:
    port: int
    redirect_port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"https://localhost:{self.admin_port}"


def write_vault_config(
    directory: Path, pki: Pki, *, profile: str = "intermediate"
) -> tuple[Path, VaultProcess]:
    port, redirect_port, admin_port = free_ports(3)
    cert, key = pki.cert("vault")
    config = directory / "vault.toml"
    config.write_text(
        'profile = "production"\n'
        "[server]\n"
        f"port = {port}\nredirect_port = {redirect_port}\n"
        f'cert_file = "{cert}"\nkey_file = "{key}"\ntls_profile = "{profile}"\n'
        "[admin]\n"
        f'port = {admin_port}\nclient_ca_file = "{pki.ca_file}"\nallowed_identities = ["admin"]\n'
        "[security_txt]\n"
        'contact = ["mailto:security@example.com", "https://example.com/security"]\n'
        'policy = "https://example.com/security-policy"\n'
    )
    return config, VaultProcess(port, redirect_port, admin_port, directory / "vault.log")


@contextlib.contextmanager
def running_vault(
    directory: Path, pki: Pki, *, profile: str = "intermediate"
) -> Iterator[VaultProcess]:
    config, info = write_vault_config(directory, pki, profile=profile)
    with cardvault_process(["vault", "serve", "--config", str(config)], log=info.log) as proc:
        for port in (info.port, info.redirect_port, info.admin_port):
            wait_for_port(port, proc)
        yield info


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[VaultProcess]:
    with running_vault(tmp_path_factory.mktemp("vault"), pki) as info:
        yield info
