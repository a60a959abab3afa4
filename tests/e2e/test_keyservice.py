"""The key service as a real process over real mutual TLS, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from cardvault.cards import holds_card_number
from cardvault.transport.tls import client_context
from helpers import Pki, cardvault_process, cli, free_port, wait_for_port

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Keyd:
    url: str
    config: Path
    shares: list[str]
    log: Path


def write_config(
    directory: Path, pki: Pki, store_url: str, *, extra: str = "", profile: str = "production"
) -> tuple[Path, int]:
    port = free_port()
    cert, key = pki.cert("keyd")
    config = directory / "keyd.toml"
    config.write_text(
        f'profile = "{profile}"\n'
        "[server]\n"
        f'port = {port}\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "{store_url}"\n'
        f'[audit]\ndirectory = "{directory / "audit"}"\n' + extra
    )
    return config, port


@pytest.fixture(scope="module")
def keyd_pki(pki: Pki) -> Pki:
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    return pki


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import asyncio

    name = f"keyd_e2e_{secrets.token_hex(4)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def store_url(kind: str, directory: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'keyd.db'}"
    else:
        with postgres_database() as dsn:
            yield dsn


@contextlib.contextmanager
def running(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with cardvault_process(["keyservice", "serve", "--config", str(config)], log=log) as proc:
        wait_for_port(port, proc)
        yield proc


def client(pki: Pki, identity: str | None) -> httpx.Client:
    pair = pki.cert(identity) if identity else None
    return httpx.Client(
        verify=client_context(pki.ca_file, client_cert=pair), trust_env=False, timeout=10
    )


@pytest.fixture(scope="module")
def keyd(tmp_path_factory: pytest.TempPathFactory, keyd_pki: Pki) -> Iterator[Keyd]:
    directory = tmp_path_factory.mktemp("keyd")
    config, port = write_config(directory, keyd_pki, f"sqlite:///{directory / 'keyd.db'}")
    r = cli(
        "keyservice",
        "init",
        "--config",
        str(config),
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out-dir",
        str(directory / "shares"),
    )
    assert r.returncode == 0, r.stderr
    shares = [
        (directory / "shares" / f"custodian-{i}.share").read_text().strip() for i in range(1, 6)
    ]
    log = directory / "keyd.log"
    with running(config, port, log):
        yield Keyd(f"https://localhost:{port}", config, shares, log)


def unseal(keyd: Keyd, pki: Pki, shares: list[str]) -> httpx.Response:
    with client(pki, "admin") as admin:
        r = httpx.Response(500)
        for share in shares:
            r = admin.post(f"{keyd.url}/v1/unseal", json={"share": share})
        return r


def seal(keyd: Keyd, pki: Pki) -> None:
    with client(pki, "admin") as admin:
        assert admin.post(f"{keyd.url}/v1/seal").status_code == 200


# --- sealing ---------------------------------------------------------------------------


def test_keyservice_starts_sealed_and_refuses_data_keys_with_503(keyd: Keyd, keyd_pki: Pki) -> None:
    with client(keyd_pki, "vault") as vault:
        r = vault.post(f"{keyd.url}/v1/keys/pan/datakey")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "keyservice_sealed"


def test_k_minus_one_shares_do_not_unseal(keyd: Keyd, keyd_pki: Pki) -> None:
    r = unseal(keyd, keyd_pki, keyd.shares[:2])
    assert r.json() == {"sealed": True, "progress": 2, "threshold": 3}
    with client(keyd_pki, "vault") as vault:
        assert vault.post(f"{keyd.url}/v1/keys/pan/datakey").status_code == 503
    seal(keyd, keyd_pki)  # wipes the partial progress


def test_wrong_share_wipes_all_progress(keyd: Keyd, keyd_pki: Pki) -> None:
    unseal(keyd, keyd_pki, keyd.shares[:2])
    bad = keyd.shares[2][:-3] + ("000" if not keyd.shares[2].endswith("000") else "111")
    r = unseal(keyd, keyd_pki, [bad])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unseal_share_invalid"
    # Progress is gone: two more good shares are not enough.
    r = unseal(keyd, keyd_pki, keyd.shares[3:5])
    assert r.json()["progress"] == 2
    assert r.json()["sealed"] is True
    seal(keyd, keyd_pki)


def test_any_k_shares_unseal_and_the_vault_gets_data_keys(keyd: Keyd, keyd_pki: Pki) -> None:
    r = unseal(keyd, keyd_pki, [keyd.shares[4], keyd.shares[0], keyd.shares[2]])
    assert r.json()["sealed"] is False
    with client(keyd_pki, "vault") as vault:
        r = vault.post(f"{keyd.url}/v1/keys/pan/datakey")
        assert r.status_code == 200
        body = r.json()
        assert len(base64.b64decode(body["plaintext"])) == 32
        r2 = vault.post(f"{keyd.url}/v1/keys/pan/unwrap", json={"ciphertext": body["ciphertext"]})
        assert r2.json()["plaintext"] == body["plaintext"]
    log = keyd.log.read_text()
    assert body["plaintext"] not in log
    assert base64.b64decode(body["plaintext"]).hex() not in log
    for share in keyd.shares:
        assert share not in log


# --- identities ------------------------------------------------------------------------

VAULT_ENDPOINTS = ["/v1/keys/pan/datakey", "/v1/keys/pan/unwrap", "/v1/keys/fingerprint/derive"]
ADMIN_ENDPOINTS = [
    "/v1/unseal",
    "/v1/seal",
    "/v1/keys/pan/rotate",
    "/v1/keys/pan/config",
    "/v1/keys/pan/destroy",
]


@pytest.mark.parametrize("path", [*VAULT_ENDPOINTS, *ADMIN_ENDPOINTS, "/v1/status"])
def test_primary_app_identity_is_refused_everywhere(keyd: Keyd, keyd_pki: Pki, path: str) -> None:
    with client(keyd_pki, "shop") as shop:
        r = (
            shop.get(f"{keyd.url}{path}")
            if path == "/v1/status"
            else shop.post(f"{keyd.url}{path}", json={})
        )
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("path", ADMIN_ENDPOINTS)
def test_vault_identity_cannot_administer(keyd: Keyd, keyd_pki: Pki, path: str) -> None:
    with client(keyd_pki, "vault") as vault:
        assert vault.post(f"{keyd.url}{path}", json={}).status_code == 403


@pytest.mark.parametrize("path", VAULT_ENDPOINTS)
def test_admin_identity_cannot_get_data_keys(keyd: Keyd, keyd_pki: Pki, path: str) -> None:
    with client(keyd_pki, "admin") as admin:
        assert admin.post(f"{keyd.url}{path}", json={}).status_code == 403


def test_no_client_certificate_fails_the_handshake(keyd: Keyd, keyd_pki: Pki) -> None:
    with client(keyd_pki, None) as anonymous, pytest.raises(httpx.HTTPError):
        anonymous.get(f"{keyd.url}/healthz")


def test_no_endpoint_returns_a_kek_or_the_root_key(keyd: Keyd, keyd_pki: Pki) -> None:
    with client(keyd_pki, "admin") as admin:
        status = admin.get(f"{keyd.url}/v1/status").json()
    assert set(status["keys"]) == {"pan", "cvc", "fingerprint"}
    for info in status["keys"].values():
        assert set(info) == {
            "latest_version", "versions", "min_decryption_version", "kind", "states",
        }  # fmt: skip
        assert set(info["states"].values()) <= {"active", "decrypt_only", "retired", "destroyed"}


# --- rotation and substitution ---------------------------------------------------------


def test_rotate_rewrap_and_min_decryption_version(keyd: Keyd, keyd_pki: Pki) -> None:
    unseal(keyd, keyd_pki, keyd.shares[:3])
    with client(keyd_pki, "vault") as vault, client(keyd_pki, "admin") as admin:
        old = vault.post(f"{keyd.url}/v1/keys/cvc/datakey").json()
        assert old["key_version"] == 1
        rotated = admin.post(f"{keyd.url}/v1/keys/cvc/rotate").json()
        assert rotated["latest_version"] == 2
        new = vault.post(f"{keyd.url}/v1/keys/cvc/datakey").json()
        assert new["key_version"] == 2
        # The old wrapped key still unwraps until min_decryption_version passes it.
        r = vault.post(f"{keyd.url}/v1/keys/cvc/unwrap", json={"ciphertext": old["ciphertext"]})
        assert r.json()["plaintext"] == old["plaintext"]
        rewrapped = admin.post(
            f"{keyd.url}/v1/keys/cvc/rewrap", json={"ciphertext": old["ciphertext"]}
        ).json()
        assert rewrapped["key_version"] == 2
        assert "plaintext" not in rewrapped
        cfg = admin.post(f"{keyd.url}/v1/keys/cvc/config", json={"min_decryption_version": 2})
        assert cfg.json()["min_decryption_version"] == 2
        r = vault.post(f"{keyd.url}/v1/keys/cvc/unwrap", json={"ciphertext": old["ciphertext"]})
        # Under a retired version: a clear, final answer (not a 503 to retry).
        assert r.status_code == 410
        assert r.json()["error"]["code"] == "key_version_unavailable"
        r = vault.post(
            f"{keyd.url}/v1/keys/cvc/unwrap", json={"ciphertext": rewrapped["ciphertext"]}
        )
        assert r.json()["plaintext"] == old["plaintext"]


def test_substituted_or_altered_wrapped_keys_are_refused(keyd: Keyd, keyd_pki: Pki) -> None:
    unseal(keyd, keyd_pki, keyd.shares[:3])
    with client(keyd_pki, "vault") as vault:
        pan = vault.post(f"{keyd.url}/v1/keys/pan/datakey").json()
        # A key wrapped for card numbers does not unwrap as a CVC key.
        r = vault.post(f"{keyd.url}/v1/keys/cvc/unwrap", json={"ciphertext": pan["ciphertext"]})
        assert r.status_code == 400
        raw = bytearray(base64.b64decode(pan["ciphertext"]))
        raw[-1] ^= 1
        r = vault.post(
            f"{keyd.url}/v1/keys/pan/unwrap", json={"ciphertext": base64.b64encode(raw).decode()}
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "ciphertext_invalid"
        assert pan["plaintext"] not in r.text


def test_derive_gives_stable_per_account_keys(keyd: Keyd, keyd_pki: Pki) -> None:
    unseal(keyd, keyd_pki, keyd.shares[:3])
    with client(keyd_pki, "vault") as vault:
        a1 = vault.post(f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "acct_a"}).json()
        a2 = vault.post(f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "acct_a"}).json()
        b = vault.post(f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "acct_b"}).json()
    assert a1 == a2
    assert a1["key"] != b["key"]


# --- what the caller chose: paths, contexts, bodies --------------------------------------


def audit_records(keyd: Keyd) -> list[dict[str, object]]:
    log = keyd.config.parent / "audit" / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def assert_no_card_number_recorded(keyd: Keyd, *numbers: str) -> None:
    """No text field of any record holds a card number (``prev`` and ``hash`` are hex
    digests, not card data), and the given numbers are nowhere in the log's file."""
    text = (keyd.config.parent / "audit" / "audit.jsonl").read_text()
    for record in audit_records(keyd):
        if record["action"] == "audit.checkpoint":
            continue  # the log's own: a digest and a signature
        fields = [record[k] for k in ("actor", "origin", "object", "request_id")]
        fields += [str(v) for v in record["detail"].values()]  # type: ignore[attr-defined]
        assert not any(isinstance(f, str) and holds_card_number(f) for f in fields), record
    for number in numbers:
        assert number not in text


def test_a_refused_identity_with_a_card_number_in_the_path_gets_403_and_a_record(
    keyd: Keyd, keyd_pki: Pki
) -> None:
    # Issue 17, item 7: this was a 500 with no record (the record refused the path).
    with client(keyd_pki, "shop") as shop:
        r = shop.post(f"{keyd.url}/v1/keys/36227206271667/datakey")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "identity_not_allowed"
    refused = [r for r in audit_records(keyd) if r["action"] == "keyservice.auth.failed"]
    assert refused[-1]["actor"] == "shop"
    assert refused[-1]["object"] == "/v1/keys/[card number]/datakey"
    assert_no_card_number_recorded(keyd, "36227206271667")
    process_log = keyd.log.read_text()
    assert "Traceback" not in process_log
    assert "36227206271667" not in process_log  # the access line's path is scrubbed too


def test_a_card_number_as_derive_context_is_a_400_and_is_recorded(
    keyd: Keyd, keyd_pki: Pki
) -> None:
    unseal(keyd, keyd_pki, keyd.shares[:3])
    with client(keyd_pki, "vault") as vault:
        refused = vault.post(
            f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "acct_5555555555554444"}
        )
        legitimate = vault.post(
            f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "acct_1NxYz2AbCdEf"}
        )
        too_long = vault.post(f"{keyd.url}/v1/keys/fingerprint/derive", json={"context": "a" * 300})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "context"
    assert "5555555555554444" not in refused.text
    assert legitimate.status_code == 200
    assert too_long.status_code == 400
    derived = [r for r in audit_records(keyd) if r["action"] == "keyservice.key.derived"]
    assert derived[-2]["result"] == "refused"
    assert derived[-2]["detail"] == {
        "context": "acct_[card number]",
        "reason": "card_number_in_context",
    }
    assert derived[-1]["result"] == "ok"
    assert_no_card_number_recorded(keyd, "5555555555554444")


@pytest.mark.parametrize(
    "body",
    [b"[" * 15_000, b'{"ciphertext":' + b"[" * 15_000, b'{"a":' * 2_500 + b"1" + b"}" * 2_500],
    ids=["brackets", "in-value", "objects"],
)
def test_a_deeply_nested_body_is_a_400(keyd: Keyd, keyd_pki: Pki, body: bytes) -> None:
    with client(keyd_pki, "vault") as vault:
        r = vault.post(
            f"{keyd.url}/v1/keys/pan/unwrap",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_malformed_key_name_is_a_400_after_the_identity_check(keyd: Keyd, keyd_pki: Pki) -> None:
    with client(keyd_pki, "vault") as vault:
        r = vault.post(f"{keyd.url}/v1/keys/4242424242424242/datakey")
        unknown = vault.post(f"{keyd.url}/v1/keys/nosuchkey/datakey")
    assert (r.status_code, r.json()["error"]["param"]) == (400, "name")
    assert "4242424242424242" not in r.text
    assert unknown.status_code == 404
    assert_no_card_number_recorded(keyd, "4242424242424242")


# --- profiles and restarts -------------------------------------------------------------


def test_dev_seal_is_refused_in_the_production_profile(tmp_path: Path, keyd_pki: Pki) -> None:
    config, _port = write_config(
        tmp_path,
        keyd_pki,
        f"sqlite:///{tmp_path / 'k.db'}",
        extra=f'[seal]\ntype = "dev"\ndev_key_file = "{tmp_path / "root.key"}"\n',
    )
    for args in (
        ["keyservice", "init", "--config", str(config)],
        ["keyservice", "serve", "--config", str(config)],
    ):
        r = cli(*args)
        assert r.returncode == 2
        assert "production profile" in r.stderr
    assert not (tmp_path / "root.key").exists()


def test_dev_seal_unseals_itself_in_development(tmp_path: Path, keyd_pki: Pki) -> None:
    config, port = write_config(
        tmp_path,
        keyd_pki,
        f"sqlite:///{tmp_path / 'k.db'}",
        extra=f'[seal]\ntype = "dev"\ndev_key_file = "{tmp_path / "root.key"}"\n',
        profile="development",
    )
    r = cli("keyservice", "init", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "DEVELOPMENT SEAL" in r.stderr
    assert (tmp_path / "root.key").stat().st_mode & 0o777 == 0o600
    with running(config, port, tmp_path / "log"), client(keyd_pki, "vault") as vault:
        assert vault.post(f"https://localhost:{port}/v1/keys/pan/datakey").status_code == 200
    assert "DEVELOPMENT SEAL" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_restart_comes_back_sealed_with_keys_intact(
    tmp_path: Path, keyd_pki: Pki, kind: str
) -> None:
    with store_url(kind, tmp_path) as url:
        config, port = write_config(tmp_path, keyd_pki, url)
        r = cli(
            "keyservice",
            "init",
            "--config",
            str(config),
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out-dir",
            str(tmp_path / "s"),
        )
        assert r.returncode == 0, r.stderr
        shares = [(tmp_path / "s" / f"custodian-{i}.share").read_text().strip() for i in (1, 2, 3)]
        info = Keyd(f"https://localhost:{port}", config, shares, tmp_path / "log")
        with running(config, port, info.log):
            unseal(info, keyd_pki, shares[:2])
            with client(keyd_pki, "vault") as vault, client(keyd_pki, "admin") as admin:
                v1 = vault.post(f"{info.url}/v1/keys/pan/datakey").json()
                admin.post(f"{info.url}/v1/keys/pan/rotate")
                v2 = vault.post(f"{info.url}/v1/keys/pan/datakey").json()
        with running(config, port, info.log), client(keyd_pki, "vault") as vault:
            assert vault.post(f"{info.url}/v1/keys/pan/datakey").status_code == 503
            unseal(info, keyd_pki, [shares[2], shares[0]])
            for old in (v1, v2):
                r = vault.post(
                    f"{info.url}/v1/keys/pan/unwrap", json={"ciphertext": old["ciphertext"]}
                )
                assert r.json()["plaintext"] == old["plaintext"]
            assert vault.post(f"{info.url}/v1/keys/pan/datakey").json()["key_version"] == 2


def test_every_key_operation_is_in_the_audit_log(keyd: Keyd, keyd_pki: Pki) -> None:
    # Runs after the tests above, which unsealed, sealed, rotated, rewrapped and were refused.
    with client(keyd_pki, "shop") as shop:
        shop.post(f"{keyd.url}/v1/keys/pan/datakey")
    log = keyd.config.parent / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    actions = {r["action"] for r in records}
    assert {
        "keyservice.config.loaded", "keyservice.start", "keyservice.unseal_share", "keyservice.unseal",
        "keyservice.seal", "keyservice.datakey.issued", "keyservice.datakey.unwrapped", "keyservice.rotate",
        "keyservice.datakey.rewrapped", "keyservice.config", "keyservice.key.derived", "keyservice.status.read",
        "keyservice.auth.failed",
    } <= actions  # fmt: skip
    rejected = [
        r for r in records if r["action"] == "keyservice.unseal_share" and r["result"] == "rejected"
    ]
    assert rejected
    assert rejected[0]["actor"] == "admin"
    refused = [r for r in records if r["action"] == "keyservice.auth.failed"]
    assert refused[-1]["actor"] == "shop"
    issued = next(r for r in records if r["action"] == "keyservice.datakey.issued")
    assert issued["actor"] == "vault"
    assert issued["origin"] == "127.0.0.1"
    assert issued["request_id"].startswith("req_")
    # No share, key or wrapped key in the log.
    text = log.read_text()
    for share in keyd.shares:
        assert share not in text
