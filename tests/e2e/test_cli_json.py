"""``--json`` on the commands that print a result: accounts, API keys and certificates.

Each command runs as the operator runs it (``python -m cardvault``, a real vault
configuration and store, a real CA on disk); its standard output must be one JSON
document holding what the text output says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography import x509

from e2e.conftest import write_vault_config
from helpers import Pki, cli


def run_json(*args: str) -> Any:
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_accounts_and_api_keys_print_json(tmp_path: Path, pki: Pki) -> None:
    config, _ = write_vault_config(tmp_path, pki)
    with config.open("a") as toml:
        toml.write(f'[store]\nurl = "sqlite:///{tmp_path / "vault.db"}"\n')
    made = run_json("accounts", "create", "--config", str(config), "--name", "shop", "--live")
    account = made["account"]
    assert account.startswith("acct_") and made["allowed_origins"] == []
    kinds = {(k["kind"], k["mode"]): k["key"] for k in made["keys"]}
    assert kinds[("secret", "test")].startswith("sk_test_")
    assert kinds[("publishable", "live")].startswith("pk_live_")

    origins = run_json(
        "accounts", "set-origins", account, "--config", str(config),
        "--origin", "https://shop.example:8443",
    )  # fmt: skip
    assert origins == {"account": account, "allowed_origins": ["https://shop.example:8443"]}

    key = run_json("api-keys", "create", "--account", account, "--config", str(config))
    assert key["account"] == account and key["kind"] == "secret" and key["mode"] == "test"
    assert key["key"].startswith("sk_test_") and key["id"].startswith("key_")
    assert run_json("api-keys", "revoke", key["id"], "--config", str(config)) == {
        "id": key["id"],
        "revoked": True,
    }
    # A second revoke fails as text does, with nothing on stdout.
    again = cli("api-keys", "revoke", key["id"], "--config", str(config), "--json")
    assert again.returncode == 1 and again.stdout == ""


def test_certs_print_json(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    made = run_json("certs", "init", "--dir", str(ca_dir))
    assert made == {"certificate": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca.key")}

    issued = run_json("certs", "issue", "--dir", str(ca_dir), "--name", "svc", "--dns", "localhost")
    cert = x509.load_pem_x509_certificate(Path(issued["certificate"]).read_bytes())
    assert issued["not_after"] == cert.not_valid_after_utc.isoformat()
    assert Path(issued["key"]).exists()

    current = run_json("certs", "renew", "--dir", str(ca_dir), issued["certificate"])
    assert current == {
        "ok": True,
        "certificates": [{"certificate": issued["certificate"], "result": "current"}],
    }
    renewed = run_json(
        "certs", "renew", "--dir", str(ca_dir), "--within", "100000", issued["certificate"]
    )
    (entry,) = renewed["certificates"]
    assert renewed["ok"] is True and entry["result"] == "renewed"
    new = x509.load_pem_x509_certificate(Path(entry["certificate"]).read_bytes())
    assert entry["not_after"] == new.not_valid_after_utc.isoformat()
    assert new.public_key() != cert.public_key()  # renewed with a new key
