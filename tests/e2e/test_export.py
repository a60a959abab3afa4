"""``cardvault export`` with real processes (keyd, the vault, the command line over
mutual TLS), and ``cardvault import`` killed midway and resumed.

A vault of its own, with an export allowlist of three recipients whose keys the test
makes with gpg (each in a temporary GNUPGHOME, :func:`cardvault.pgp.new_key`): ``acme``
(RSA 4096, usable), ``small`` (RSA 2048: refused at load), ``mismatch`` (acme's key file
under small's fingerprint: refused at load). Export approval: 2 of 3 shares of the
export-approval ceremony. Card numbers: only the published test cards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cardvault import pgp
from e2e.test_key_lifecycle import NUMBERS
from helpers import Pki, cardvault_process, cli, free_ports, wait_for_port
from hostile.hostile_support import card_numbers_in

ROWS = 2000
#: The kill-and-resume import: enough rows that the vault is killed well inside it.
KILL_ROWS = 12_000
KILL_AT = 2000


@dataclass
class Env:
    dir: Path
    env: dict[str, str]
    vault_config: Path
    vault_port: int
    admin_port: int
    export_shares: list[Path]
    keyd_shares: list[Path]
    recipient: pgp.NewKey
    small: pgp.NewKey
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    vault: subprocess.Popen[bytes] | None = None

    def start_vault(self) -> None:
        self.vault = self.stack.enter_context(
            cardvault_process(
                ["vault", "serve", "--config", str(self.vault_config)],
                log=self.dir / "vault.log",
            )
        )
        wait_for_port(self.vault_port, self.vault)
        wait_for_port(self.admin_port, self.vault)

    def kill_vault(self) -> None:
        assert self.vault is not None
        self.vault.send_signal(signal.SIGKILL)
        self.vault.wait(10)


def run(e: Env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **e.env}
    environment.pop("CARDVAULT_STACK", None)
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        capture_output=True, text=True, timeout=300, env=environment, cwd=e.dir, input=stdin,
    )  # fmt: skip


@pytest.fixture(scope="module")
def e(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("export")
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    kport, vport, admin_port = free_ports(3)
    kcert, kkey = pki.cert("keyd")
    kconf = d / "keyd.toml"
    kconf.write_text(
        f'profile = "development"\n[server]\nport = {kport}\ncert_file = "{kcert}"\n'
        f'key_file = "{kkey}"\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "keyd.db"}"\n[audit]\ndirectory = "{d / "keyd-audit"}"\n'
    )
    r = cli("keyservice", "init", "--config", str(kconf), "--shares", "3", "--threshold", "2",
            "--out-dir", str(d / "shares"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("export-approval", "create", "--shares", "3", "--threshold", "2",
            "--approval-file", str(d / "export-approval.json"),
            "--out-dir", str(d / "export-shares"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "cvsh" not in (d / "export-approval.json").read_text()  # the check, no share

    recipient = pgp.new_key("acme migrations", key_length=4096)
    small = pgp.new_key("small", key_length=2048)
    keys = d / "recipients"
    keys.mkdir()
    (keys / "acme.asc").write_text(recipient.public_key)
    (keys / "small.asc").write_text(small.public_key)
    (keys / "recipients.toml").write_text(
        f'[[recipient]]\nname = "acme"\nfingerprint = "{recipient.fingerprint}"\n'
        'public_key_file = "acme.asc"\n'
        f'[[recipient]]\nname = "small"\nfingerprint = "{small.fingerprint}"\n'
        'public_key_file = "small.asc"\n'
        f'[[recipient]]\nname = "mismatch"\nfingerprint = "{small.fingerprint}"\n'
        'public_key_file = "acme.asc"\n'
    )
    vcert, vkey = pki.cert("vault")
    vconf = d / "vault.toml"
    vconf.write_text(
        f'profile = "development"\n[server]\nport = {vport}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[admin]\nport = {admin_port}\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "vault.db"}"\n[audit]\ndirectory = "{d / "audit"}"\n'
        f'[keyservice]\nurl = "https://localhost:{kport}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[exports]\nrecipients_file = "{keys / "recipients.toml"}"\n'
        f'approval_file = "{d / "export-approval.json"}"\n'
    )  # fmt: skip
    r = cli("accounts", "create", "--config", str(vconf), "--name", "t")
    assert r.returncode == 0, r.stderr
    admin_cert, admin_key = pki.cert("admin")
    env = {
        "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{admin_port}",
        "CARDVAULT_CA_BUNDLE": str(pki.ca_file),
        "CARDVAULT_ADMIN_CERT": str(admin_cert),
        "CARDVAULT_ADMIN_KEY": str(admin_key),
    }
    e = Env(
        d, env, vconf, vport, admin_port,
        [d / "export-shares" / f"custodian-{i}.share" for i in (1, 2, 3)],
        [d / "shares" / f"custodian-{i}.share" for i in (1, 2, 3)],
        recipient, small,
    )  # fmt: skip
    with e.stack:
        keyd = e.stack.enter_context(
            cardvault_process(["keyservice", "serve", "--config", str(kconf)], log=d / "keyd.log")
        )
        wait_for_port(kport, keyd)
        for share in e.keyd_shares[:2]:
            r = cli("keyservice", "unseal", "--share-file", str(share), "--url",
                    f"https://localhost:{kport}", "--ca-bundle", str(pki.ca_file), "--cert",
                    str(admin_cert), "--key", str(admin_key))  # fmt: skip
            assert r.returncode == 0, r.stderr
        e.start_vault()
        yield e


def account_id(e: Env) -> str:
    with sqlite3.connect(e.dir / "vault.db") as db:
        (acct,) = db.execute("SELECT id FROM accounts ORDER BY created LIMIT 1").fetchone()
    return str(acct)


def audit_text(e: Env) -> str:
    return "".join(p.read_text() for p in sorted((e.dir / "audit").glob("*")) if p.is_file())


def rows_of(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "object": "card", "number": NUMBERS[i % len(NUMBERS)],
         "exp_month": 1 + i % 12, "exp_year": 2031 + i % 5, "name": f"Holder {i}",
         "metadata": {"row": str(i)}}
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def import_key(e: Env) -> dict[str, Any]:
    r = run(e, "import-key", "create")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def encrypted_file(key: dict[str, Any], path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = path.with_name(path.name + ".gpg")
    with target.open("wb") as fh:
        pgp.encrypt(key["public_key"], key["fingerprint"], path, fh.write)
    path.unlink()  # only ciphertext stays on the disk
    return target


def approve(e: Env, acct: str, to: str, share: Path) -> subprocess.CompletedProcess[str]:
    return run(e, "export-approval", "submit", "--account", acct, "--to", to,
               "--share-file", str(share))  # fmt: skip


def decrypt(key: pgp.NewKey, path: Path) -> list[dict[str, Any]]:
    plain = bytearray()
    pgp.decrypt(key.secret_key, key.passphrase, path, lambda c: plain.extend(c) or True)
    return [json.loads(line) for line in plain.decode().splitlines()]


def test_cards_imported_then_exported_round_trip_unchanged(
    e: Env, import_key: dict[str, Any], tmp_path: Path
) -> None:
    acct = account_id(e)
    rows = rows_of(ROWS, "rt_")
    source = encrypted_file(import_key, tmp_path / "in.jsonl", rows)
    r = run(e, "import", str(source), "--account", acct, "--out", str(tmp_path / "map.csv"))
    assert r.returncode == 0, r.stderr
    mapping = dict(line.split(",") for line in (tmp_path / "map.csv").read_text().splitlines()[1:])
    assert len(mapping) == ROWS

    # Not approved yet: refused, and nothing written.
    target = tmp_path / "out.jsonl.gpg"
    r = run(e, "export", "--account", acct, "--to", "acme", "--out", str(target))
    assert r.returncode == 1 and "not_approved" in r.stderr
    assert not target.exists()
    first = approve(e, acct, "acme", e.export_shares[0])
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["approved"] is False
    second = approve(e, acct, "acme", e.export_shares[2])
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["approved"] is True

    r = run(e, "export", "--account", acct, "--to", "acme", "--out", str(target))
    assert r.returncode == 0, r.stderr
    assert card_numbers_in(r.stdout + r.stderr) == []
    assert target.read_bytes()[:1] != b"{"  # an OpenPGP message, not the JSON lines
    exported = {card["id"]: card for card in decrypt(e.recipient, target)}
    assert len(exported) == ROWS
    with sqlite3.connect(e.dir / "vault.db") as db:
        fingerprints = dict(db.execute("SELECT id, fingerprint FROM payment_methods"))
    for row in rows:
        card = exported[mapping[row["id"]]]
        assert card["card"]["number"] == row["number"]
        assert (card["card"]["exp_month"], card["card"]["exp_year"]) == (
            row["exp_month"], row["exp_year"],
        )  # fmt: skip
        assert card["billing_details"]["name"] == row["name"]
        assert card["metadata"] == row["metadata"]
        assert card["card"]["fingerprint"] == fingerprints[card["id"]]

    # The approval was for one export: the next one needs approving again.
    again = run(e, "export", "--account", acct, "--to", "acme", "--out", str(tmp_path / "2"))
    assert again.returncode == 1 and "not_approved" in again.stderr

    audit = audit_text(e)
    assert audit.count('"export.approval"') >= 2
    assert audit.count('"export.approved"') == 1
    assert audit.count('"export.started"') == 1
    completed = [json.loads(line) for line in audit.splitlines() if '"export.completed"' in line]
    assert len(completed) == 1
    assert f'"cards":{ROWS}' in json.dumps(completed[0], separators=(",", ":"))
    # Nothing of a card number in the vault's state directory (databases, audit log,
    # logs, the spool) nor in the export's own output.
    scan = run(e, "scan", str(e.dir))
    assert scan.returncode == 0, scan.stdout + scan.stderr


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("nobody", "recipient_not_allowed"),
        # A name that is a card number: refused, and recorded without it.
        ("4242424242424242", "recipient_not_allowed"),
        ("mismatch", "fingerprint_mismatch"),
        ("small", "key_refused"),
    ],
)
def test_an_export_to_a_recipient_not_allowed_is_refused_and_audited(
    e: Env, tmp_path: Path, to: str, reason: str
) -> None:
    acct = account_id(e)
    before = audit_text(e).count(f'"reason":"{reason}"')
    r = run(e, "export", "--account", acct, "--to", to, "--out", str(tmp_path / "x.gpg"))
    assert r.returncode == 1
    assert f"export_refused ({reason})" in " ".join(r.stderr.split())
    assert not (tmp_path / "x.gpg").exists()
    # Approving such an export is refused too, before any share is looked at.
    a = approve(e, acct, to, e.export_shares[0])
    assert a.returncode == 1 and reason in a.stderr
    audit = audit_text(e)
    assert audit.count(f'"reason":"{reason}"') == before + 2
    assert card_numbers_in(audit + r.stderr + a.stderr) == []


def test_too_few_approvals_and_a_bad_share_wipe_all_approvals(e: Env, tmp_path: Path) -> None:
    acct = account_id(e)
    assert json.loads(approve(e, acct, "acme", e.export_shares[0]).stdout)["progress"] == 1
    r = run(e, "export", "--account", acct, "--to", "acme", "--out", str(tmp_path / "x.gpg"))
    assert r.returncode == 1 and "not_approved" in r.stderr  # 1 of 2

    # The key service's own custodian share is of another split: refused, and the
    # approval given above is wiped.
    bad = approve(e, acct, "acme", e.keyd_shares[0])
    assert bad.returncode == 1 and "approval_share_invalid" in bad.stderr
    after = json.loads(approve(e, acct, "acme", e.export_shares[1]).stdout)
    assert (after["progress"], after["approved"]) == (1, False)
    # The same share twice: refused, everything wiped again.
    twice = approve(e, acct, "acme", e.export_shares[1])
    assert twice.returncode == 1 and "approval_share_invalid" in twice.stderr
    r = run(e, "export", "--account", acct, "--to", "acme", "--out", str(tmp_path / "x.gpg"))
    assert r.returncode == 1 and "not_approved" in r.stderr
    assert not (tmp_path / "x.gpg").exists()

    audit = audit_text(e)
    rejected = [
        line for line in audit.splitlines()
        if '"export.approval"' in line and '"approval_share_invalid"' in line
    ]  # fmt: skip
    assert len(rejected) >= 2
    log = (e.dir / "vault.log").read_text(errors="replace")
    assert card_numbers_in(audit + log + bad.stderr + twice.stderr) == []


def count_pms(e: Env, prefix: str) -> tuple[int, int]:
    """(payment methods linked to external ids with ``prefix``, distinct ids)."""
    with sqlite3.connect(e.dir / "vault.db") as db:
        (pms, ids) = db.execute(
            "SELECT count(*), count(DISTINCT l.external_id) FROM payment_methods p "
            "JOIN import_links l ON l.pm_id = p.id WHERE l.external_id LIKE ?",
            (f"{prefix}%",),
        ).fetchone()
    return int(pms), int(ids)


def test_an_import_whose_vault_is_killed_midway_resumes_each_row_once(
    e: Env, import_key: dict[str, Any], tmp_path: Path
) -> None:
    acct = account_id(e)
    rows = rows_of(KILL_ROWS, "kill_")
    source = encrypted_file(import_key, tmp_path / "big.jsonl", rows)
    with sqlite3.connect(e.dir / "vault.db") as db:
        (total_before,) = db.execute("SELECT count(*) FROM payment_methods").fetchone()
    mapping = tmp_path / "big.mapping.csv"
    args = ["import", str(source), "--account", acct, "--batch-size", "100",
            "--out", str(mapping)]  # fmt: skip
    environment = {**os.environ, **e.env}
    environment.pop("CARDVAULT_STACK", None)
    job = subprocess.Popen(
        [sys.executable, "-m", "cardvault", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=environment, cwd=e.dir,
    )  # fmt: skip
    assert job.stdout is not None
    done = 0
    for raw in job.stdout:
        event = json.loads(raw)
        assert event["event"] != "done", "the import ended before the vault was killed"
        if event["event"] == "batch":
            done = event["done"]
            if done >= KILL_AT:
                break
    assert e.vault is not None
    killed = e.vault.pid
    e.kill_vault()  # SIGKILL: mid-batch, mid-transaction
    job.wait(60)
    assert job.returncode != 0
    assert not mapping.exists()
    stored, _ = count_pms(e, "kill_")
    assert KILL_AT <= stored < KILL_ROWS

    e.start_vault()
    # The killed vault's gpg home (the import key's secret half, maybe its agent) was
    # swept when the new one started.
    for home in Path(tempfile.gettempdir()).glob("cv-gpg-*"):
        with contextlib.suppress(OSError):
            assert (home / "owner.pid").read_text() != str(killed)
    r = run(e, *args)
    assert r.returncode == 0, r.stderr
    summary = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")][-1]
    assert (summary["rows"], summary["imported"], summary["invalid"]) == (KILL_ROWS, KILL_ROWS, 0)
    # Every row exactly once: one payment method per external id, none left over.
    assert count_pms(e, "kill_") == (KILL_ROWS, KILL_ROWS)
    with sqlite3.connect(e.dir / "vault.db") as db:
        (total_after,) = db.execute("SELECT count(*) FROM payment_methods").fetchone()
    assert total_after - total_before == KILL_ROWS
    lines = mapping.read_text().splitlines()[1:]
    assert len(lines) == KILL_ROWS
    assert {line.split(",")[0] for line in lines} == {r["id"] for r in rows}
    assert len({line.split(",")[1] for line in lines}) == KILL_ROWS
    # The same command once more: nothing new.
    again = run(e, *args)
    assert again.returncode == 0, again.stderr
    assert count_pms(e, "kill_") == (KILL_ROWS, KILL_ROWS)
