"""The deployment a benchmark starts: a test PKI, the key service's and the vault's
settings files, and an account with its test-mode keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cardvault.transport.certs import init_ca

#: Per-key rate limits out of the way, for the secret and the publishable key: the load
#: must reach what it measures.
OPEN_LIMITS = {
    "secret_rate": 1_000_000.0,
    "secret_burst": 1_000_000.0,
    "publishable_rate": 1_000_000.0,
    "publishable_burst": 1_000_000.0,
}


@dataclass
class Pki:
    ca: Path
    keyd: tuple[Path, Path]
    vault: tuple[Path, Path]


def make_pki(directory: Path) -> Pki:
    ca = init_ca(directory / "pki")
    keyd = ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    vault = ca.issue("vault", dns=["localhost"], ips=["127.0.0.1"], client_identity="vault")
    return Pki(ca.cert_path, (keyd.cert_path, keyd.key_path), (vault.cert_path, vault.key_path))


def keyd_config(directory: Path, pki: Pki, port: int) -> Path:
    config = directory / "keyd.toml"
    config.write_text(
        'profile = "development"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'cert_file = "{pki.keyd[0]}"\nkey_file = "{pki.keyd[1]}"\n'
        f'client_ca_file = "{pki.ca}"\n'
        f'[store]\nurl = "sqlite:///{directory / "keyd.db"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{directory / "root.key"}"\n'
        # JSON lines (the production format) so that its access lines can be counted.
        '[logging]\nformat = "json"\n'
    )
    return config


def vault_config(
    directory: Path,
    pki: Pki,
    port: int,
    keyd_port: int,
    store_url: str,
    *,
    limits: dict[str, float] | None = None,
) -> Path:
    """The vault's settings: the production profile (JSON log lines at the default level,
    info), ``store_url``, the key service over mutual TLS, and ``limits`` as the only
    non-defaults (default: :data:`OPEN_LIMITS`)."""
    config = directory / "vault.toml"
    table = "".join(f"{name} = {value!r}\n" for name, value in (limits or OPEN_LIMITS).items())
    config.write_text(
        'profile = "production"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'cert_file = "{pki.vault[0]}"\nkey_file = "{pki.vault[1]}"\n'
        f'[store]\nurl = "{store_url}"\n'
        "[keyservice]\n"
        f'url = "https://localhost:{keyd_port}"\nca_file = "{pki.ca}"\n'
        f'cert_file = "{pki.vault[0]}"\nkey_file = "{pki.vault[1]}"\n'
        "[limits]\n"
        + table
        +
        # With PostgreSQL the audit log's directory must be named (with SQLite it is
        # the database's own directory, the same place).
        f'[audit]\ndirectory = "{directory / "audit"}"\n'
    )
    return config


def create_account(config: Path, log: Path) -> dict[str, str]:
    """A new account: its test-mode keys, ``{"publishable": "pk_test_…", "secret":
    "sk_test_…"}``."""
    result = subprocess.run(
        [sys.executable, "-m", "cardvault", "accounts", "create", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    with open(log, "a") as fh:
        fh.write(result.stderr)
    keys = {}
    for kind, prefix in (("publishable", "pk_test_"), ("secret", "sk_test_")):
        found = re.search(rf"^{kind} \(test\)\s+({prefix}\S+)\s*$", result.stdout, re.M)
        if found:
            keys[kind] = found.group(1)
    if result.returncode != 0 or len(keys) != 2:
        raise RuntimeError(f"accounts create failed ({result.returncode}):\n{result.stderr}")
    return keys
