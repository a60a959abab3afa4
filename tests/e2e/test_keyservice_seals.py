"""The HSM seal (PKCS#11, against SoftHSM2), the reseal between seals and the custodian
re-key, with the key service as a real process over mutual TLS."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from e2e.test_keyservice import client, running, write_config
from e2e.test_keyservice import keyd_pki as keyd_pki  # the module's fixture, shared
from helpers import Pki
from softhsm import SoftHsm, find_module, make_token

pytestmark = pytest.mark.skipif(
    find_module() is None, reason="SoftHSM2 is not installed (scripts/test installs softhsm2)"
)


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    return make_token(tmp_path_factory.mktemp("softhsm"))


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def setup(
    directory: Path, pki: Pki, hsm: SoftHsm, *, seal: str, pin_file: Path | None = None
) -> tuple[Path, int]:
    extra = f'[seal]\ntype = "{seal}"\n' + hsm.seal_settings(pin_file=pin_file)
    return write_config(directory, pki, f"sqlite:///{directory / 'keyd.db'}", extra=extra)


def set_seal_type(config: Path, seal: str) -> None:
    text = config.read_text()
    for old in ('type = "shamir"', 'type = "pkcs11"'):
        text = text.replace(old, f'type = "{seal}"')
    config.write_text(text)


def share_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("custodian-*.share"), key=lambda p: int(p.stem.split("-")[1]))


def status(url: str, pki: Pki) -> dict[str, object]:
    with client(pki, "admin") as admin:
        return admin.get(f"{url}/v1/status").json()  # type: ignore[no-any-return]


def unseal(url: str, pki: Pki, shares: list[Path]) -> httpx.Response:
    r = httpx.Response(500)
    with client(pki, "admin") as admin:
        for path in shares:
            r = admin.post(f"{url}/v1/unseal", json={"share": path.read_text().strip()})
    return r


def datakeys(url: str, pki: Pki, count: int) -> list[dict[str, str]]:
    with client(pki, "vault") as vault:
        return [vault.post(f"{url}/v1/keys/pan/datakey").json() for _ in range(count)]


def unwraps(url: str, pki: Pki, keys: list[dict[str, str]]) -> bool:
    with client(pki, "vault") as vault:
        return all(
            vault.post(f"{url}/v1/keys/pan/unwrap", json={"ciphertext": k["ciphertext"]}).json()
            .get("plaintext") == k["plaintext"]
            for k in keys
        )  # fmt: skip


def audit(directory: Path) -> list[dict[str, object]]:
    lines = (directory / "audit" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def meta(directory: Path, key: str) -> str:
    with sqlite3.connect(directory / "keyd.db") as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


# --- the HSM seal -------------------------------------------------------------------------


def test_pkcs11_seal_unseals_at_start_and_the_root_key_never_leaves_the_token(
    tmp_path: Path, keyd_pki: Pki, hsm: SoftHsm
) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    config, port = setup(tmp_path, keyd_pki, hsm, seal="pkcs11")
    r = run_cli("keyservice", "init", "--config", str(config), "--out-dir", str(tmp_path / "ap"))
    assert r.returncode == 0, r.stderr
    # The shares are approval shares: the root key is in the token, in no share.
    assert "approve a key version's destruction" in " ".join(r.stdout.split())
    seal = json.loads(meta(tmp_path, "seal"))
    assert seal["approval"]["split_id"] != seal.get("split_id")
    assert "wrapped_root" not in seal
    url = f"https://localhost:{port}"
    with running(config, port, tmp_path / "keyd.log"):
        st = status(url, keyd_pki)
        assert (st["sealed"], st["seal_type"]) == (False, "pkcs11")
        keys = datakeys(url, keyd_pki, 3)
        assert unwraps(url, keyd_pki, keys)

    # The stored KEKs are sealed by the token (format 0x03), not by a software root key.
    with sqlite3.connect(tmp_path / "keyd.db") as conn:
        assert all(row[0][0] == 0x03 for row in conn.execute("SELECT sealed FROM keks"))
    key_id = bytes.fromhex(json.loads(meta(tmp_path, "seal"))["key_id"])

    # The token refuses to give the root key out, by reading or by wrapping.
    lib = pkcs11.lib(str(hsm.module))
    token = lib.get_token(token_label=hsm.label)
    with token.open(rw=True, user_pin=hsm.pin_file.read_text().strip()) as session:
        root = session.get_key(object_class=ObjectClass.SECRET_KEY, id=key_id)
        assert root[Attribute.SENSITIVE] is True
        assert root[Attribute.EXTRACTABLE] is False
        assert root[Attribute.NEVER_EXTRACTABLE] is True  # generated inside, never out
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            root[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, template={Attribute.WRAP: True})
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(root, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            root[Attribute.EXTRACTABLE] = True


def test_a_wrong_pin_leaves_the_key_service_sealed_with_a_clear_error(
    tmp_path: Path, keyd_pki: Pki, hsm: SoftHsm
) -> None:
    config, port = setup(tmp_path, keyd_pki, hsm, seal="pkcs11")
    assert run_cli("keyservice", "init", "--config", str(config)).returncode == 0
    text = config.read_text()
    config.write_text(text.replace(str(hsm.pin_file), str(hsm.wrong_pin_file)))
    url, log = f"https://localhost:{port}", tmp_path / "keyd.log"
    with running(config, port, log):
        assert status(url, keyd_pki)["sealed"] is True
        with client(keyd_pki, "vault") as vault:
            r = vault.post(f"{url}/v1/keys/pan/datakey")
        assert r.json()["error"]["code"] == "keyservice_sealed"
    assert "PIN incorrect" in log.read_text()
    refused = [r for r in audit(tmp_path) if r["action"] == "keyservice.unseal"]
    assert refused[-1]["result"] == "refused"
    assert "PIN incorrect" in str(refused[-1]["detail"])
    # The right PIN again: a restart unseals.
    config.write_text(text)
    with running(config, port, log):
        assert status(url, keyd_pki)["sealed"] is False


def test_destroy_under_the_hsm_seal_needs_k_approval_shares_and_rekey_replaces_them(
    tmp_path: Path, keyd_pki: Pki, hsm: SoftHsm
) -> None:
    """Under the HSM seal no share rebuilds the root key, yet a key version is destroyed
    only with K custodians' approval: the approval shares ``init`` hands out. A bad
    share wipes the approvals; a re-key replaces the shares (the old ones are refused)."""
    config, port = setup(tmp_path, keyd_pki, hsm, seal="pkcs11")
    first, second = tmp_path / "first", tmp_path / "second"
    r = run_cli("keyservice", "init", "--config", str(config), "--shares", "3",
                "--threshold", "2", "--out-dir", str(first))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(share_files(first)) == 3
    url, log = f"https://localhost:{port}", tmp_path / "keyd.log"

    def destroy(admin: httpx.Client, share: Path | None) -> httpx.Response:
        body = {"version": 1} | ({"share": share.read_text().strip()} if share else {})
        return admin.post(f"{url}/v1/keys/pan/destroy", json=body)

    with running(config, port, log), client(keyd_pki, "admin") as admin:
        assert status(url, keyd_pki)["sealed"] is False
        assert admin.post(f"{url}/v1/keys/pan/rotate").status_code == 200
        r = admin.post(f"{url}/v1/keys/pan/config", json={"min_decryption_version": 2})
        assert r.status_code == 200, r.text
        # No share: refused, named.
        r = destroy(admin, None)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "share")
        # One approval, then a share of no split of this service: every approval wiped.
        assert destroy(admin, share_files(first)[0]).json()["progress"] == 1
        foreign = tmp_path / "foreign.share"
        from cardvault import crypto

        (bogus,) = crypto.shamir_split(bytes(32), 2, 2)[:1]
        foreign.write_text(bogus.to_text())
        r = destroy(admin, foreign)
        assert r.json()["error"]["code"] == "unseal_share_invalid"
        assert destroy(admin, share_files(first)[1]).json()["progress"] == 1
    # Re-key: K current approval shares (from stdin) make new ones.
    stdin = "\n".join(p.read_text().strip() for p in share_files(first)[1:3]) + "\n"
    r = run_cli("keyservice", "rekey", "--config", str(config), "--shares", "3",
                "--threshold", "2", "--out-dir", str(second), stdin=stdin)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("keyservice", "rekey", "--config", str(config),
                *[a for p in share_files(first)[:2] for a in ("--share-file", str(p))])  # fmt: skip
    assert r.returncode == 1
    assert "another split" in r.stderr
    with running(config, port, log), client(keyd_pki, "admin") as admin:
        # The old shares approve nothing any more.
        r = destroy(admin, share_files(first)[0])
        assert r.json()["error"]["code"] == "unseal_share_invalid"
        assert destroy(admin, share_files(second)[2]).json()["progress"] == 1
        done = destroy(admin, share_files(second)[0]).json()
        assert (done["destroyed"], done["threshold"]) == (True, 2)
        assert status(url, keyd_pki)["keys"]["pan"]["states"]["1"] == "destroyed"  # type: ignore[index]
    with sqlite3.connect(tmp_path / "keyd.db") as conn:
        assert conn.execute(
            "SELECT count(*) FROM keks WHERE name = 'pan' AND version = 1"
        ).fetchone() == (0,)
    actions = [(r["action"], r["result"]) for r in audit(tmp_path)]
    assert ("keyservice.destroy_approval", "rejected") in actions
    assert ("keyservice.rekey", "ok") in actions
    assert actions.count(("keyservice.destroy", "ok")) == 1
    everything = (tmp_path / "audit" / "audit.jsonl").read_text() + log.read_text()
    for path in share_files(first) + share_files(second):
        assert path.read_text().strip() not in everything


# --- reseal: Shamir → PKCS#11 → Shamir ----------------------------------------------------


def test_reseal_shamir_to_pkcs11_and_back_keeps_every_data_key(
    tmp_path: Path, keyd_pki: Pki, hsm: SoftHsm
) -> None:
    config, port = setup(tmp_path, keyd_pki, hsm, seal="shamir")
    first = tmp_path / "first"
    r = run_cli("keyservice", "init", "--config", str(config), "--shares", "3",
                "--threshold", "2", "--out-dir", str(first))  # fmt: skip
    assert r.returncode == 0, r.stderr
    url, log = f"https://localhost:{port}", tmp_path / "keyd.log"
    with running(config, port, log):
        assert unseal(url, keyd_pki, share_files(first)[:2]).json()["sealed"] is False
        keys = datakeys(url, keyd_pki, 5)
        # Refused while the service runs: it holds its audit log.
        r = run_cli("keyservice", "reseal", "--to", "pkcs11", "--config", str(config),
                    *[a for p in share_files(first)[:2] for a in ("--share-file", str(p))])  # fmt: skip
        assert r.returncode == 1
        assert "running" in r.stderr

    # Shamir → PKCS#11 (two current shares open the old seal).
    r = run_cli("keyservice", "reseal", "--to", "pkcs11", "--config", str(config),
                "--share-file", str(share_files(first)[0]),
                "--share-file", str(share_files(first)[2]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    set_seal_type(config, "pkcs11")
    with running(config, port, log):
        assert status(url, keyd_pki)["seal_type"] == "pkcs11"
        assert status(url, keyd_pki)["sealed"] is False  # from the token, at start
        assert unwraps(url, keyd_pki, keys)
        keys += datakeys(url, keyd_pki, 2)

    # PKCS#11 → Shamir: a new root key, in new shares; the old shares open nothing.
    second = tmp_path / "second"
    r = run_cli("keyservice", "reseal", "--to", "shamir", "--config", str(config),
                "--shares", "4", "--threshold", "3", "--out-dir", str(second))  # fmt: skip
    assert r.returncode == 0, r.stderr
    set_seal_type(config, "shamir")
    with running(config, port, log):
        st = status(url, keyd_pki)
        assert (st["sealed"], st["seal_type"], st["threshold"]) == (True, "shamir", 3)
        old = unseal(url, keyd_pki, share_files(first)[:1])
        assert old.status_code == 400
        assert old.json()["error"]["code"] == "unseal_share_invalid"
        assert unseal(url, keyd_pki, share_files(second)[1:4]).json()["sealed"] is False
        assert unwraps(url, keyd_pki, keys)

    records = [r for r in audit(tmp_path) if r["action"] == "keyservice.reseal"]
    assert [(r["detail"]["from"], r["detail"]["to"]) for r in records] == [  # type: ignore[index]
        ("shamir", "pkcs11"),
        ("pkcs11", "shamir"),
    ]
    everything = (tmp_path / "audit" / "audit.jsonl").read_text() + log.read_text()
    for path in share_files(first) + share_files(second):
        assert path.read_text().strip() not in everything


# --- custodian re-key ---------------------------------------------------------------------


def test_rekey_replaces_the_shares_and_keeps_the_root_key(tmp_path: Path, keyd_pki: Pki) -> None:
    config, port = write_config(tmp_path, keyd_pki, f"sqlite:///{tmp_path / 'keyd.db'}")
    first, second = tmp_path / "first", tmp_path / "second"
    r = run_cli("keyservice", "init", "--config", str(config), "--shares", "5",
                "--threshold", "3", "--out-dir", str(first))  # fmt: skip
    assert r.returncode == 0, r.stderr
    kcv = meta(tmp_path, "root_kcv")
    url, log = f"https://localhost:{port}", tmp_path / "keyd.log"
    with running(config, port, log):
        assert unseal(url, keyd_pki, share_files(first)[:3]).json()["sealed"] is False
        keys = datakeys(url, keyd_pki, 3)

    # Too few or wrong current shares: refused, nothing changed.
    r = run_cli("keyservice", "rekey", "--config", str(config),
                "--share-file", str(share_files(first)[0]))  # fmt: skip
    assert r.returncode == 1
    assert "3 current custodian shares are needed" in r.stderr

    # New custodians: 3 shares, any 2 unseal. The shares come through stdin here.
    stdin = "\n".join(p.read_text().strip() for p in share_files(first)[2:5]) + "\n"
    r = run_cli("keyservice", "rekey", "--config", str(config), "--shares", "3",
                "--threshold", "2", "--out-dir", str(second), stdin=stdin)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert meta(tmp_path, "root_kcv") == kcv  # the same root key
    assert len(share_files(second)) == 3

    with running(config, port, log):
        for old in share_files(first):
            r = unseal(url, keyd_pki, [old])
            assert (r.status_code, r.json()["error"]["code"]) == (400, "unseal_share_invalid")
        assert status(url, keyd_pki)["threshold"] == 2
        r = unseal(url, keyd_pki, [share_files(second)[2], share_files(second)[0]])
        assert r.json()["sealed"] is False
        assert unwraps(url, keyd_pki, keys)

    # A second re-key needs the new shares: the old ones are another split.
    r = run_cli("keyservice", "rekey", "--config", str(config),
                *[a for p in share_files(first)[:3] for a in ("--share-file", str(p))])  # fmt: skip
    assert r.returncode == 1
    assert "another split" in r.stderr

    rekeys = [r for r in audit(tmp_path) if r["action"] == "keyservice.rekey"]
    assert len(rekeys) == 1
    detail = rekeys[0]["detail"]
    assert (detail["old_shares"], detail["old_threshold"]) == (5, 3)  # type: ignore[index]
    assert (detail["shares"], detail["threshold"]) == (3, 2)  # type: ignore[index]
    everything = (tmp_path / "audit" / "audit.jsonl").read_text() + log.read_text()
    for path in share_files(first) + share_files(second):
        assert path.read_text().strip() not in everything


def test_old_shares_rebuild_nothing_stored_after_a_rekey(tmp_path: Path, keyd_pki: Pki) -> None:
    """Not only refused by split id: K old shares rebuild an unseal key that opens
    nothing the store holds once a re-key has replaced the split (wrapped form)."""
    from cardvault import crypto
    from cardvault.keyservice.seals import root_from_shares

    config, _port = write_config(tmp_path, keyd_pki, f"sqlite:///{tmp_path / 'keyd.db'}")
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli("keyservice", "init", "--config", str(config), "--shares", "3",
                   "--threshold", "2", "--out-dir", str(first)).returncode == 0  # fmt: skip
    for source, target in ((first, second), (second, third)):
        args = [a for p in share_files(source)[:2] for a in ("--share-file", str(p))]
        r = run_cli("keyservice", "rekey", "--config", str(config), "--shares", "3",
                    "--threshold", "2", "--out-dir", str(target), *args)  # fmt: skip
        assert r.returncode == 0, r.stderr
    seal = json.loads(meta(tmp_path, "seal"))
    old = [crypto.Share.from_text(p.read_text()) for p in share_files(second)[:2]]
    with pytest.raises(crypto.InvalidShare):
        root_from_shares(seal, crypto.shamir_combine(old))
    new = [crypto.Share.from_text(p.read_text()) for p in share_files(third)[:2]]
    with root_from_shares(seal, crypto.shamir_combine(new)) as root:
        assert crypto.key_check_value(root) == meta(tmp_path, "root_kcv")
    assert base64.b64decode(seal["wrapped_root"])  # the root key is stored only sealed
