"""The key lifecycle with real processes: a vault with cards, rotate, re-encrypt while a
client tokenizes and forwards, kill -9 the job and resume it, retire, destroy with
custodian approval (crypto-shredding), and fingerprints across a fingerprint rotation.

A vault with 10,000 cards, each under its own data key (so that each is a stored key to
move); bench/reencrypt.py measures the same job's rate and its cost to live traffic."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import ROOT, Pki, cli, free_ports, keyservice_and_vault, wait_for_port

CARDS = 10_000
#: Where the paced job (150 a second) is killed: far enough in for several batches.
MIDWAY = 600
NUMBERS = ["4242424242424242", "5555555555554444", "4000056655665556", "5200828282828210"]


@dataclass
class Lifecycle:
    dir: Path
    url: str
    sk: str
    shares: list[Path]
    env: dict[str, str]
    keyd_db: Path
    vault_db: Path
    acquirer_url: str


def environment(life: Lifecycle) -> dict[str, str]:
    """The CLI's environment: every target named, no stack file to find."""
    env = {**os.environ, **life.env}
    env.pop("CARDVAULT_STACK", None)
    return env


def keys_cli(life: Lifecycle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cardvault", "keys", *args],
        capture_output=True, text=True, timeout=120, env=environment(life), cwd=life.dir,
    )  # fmt: skip


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Lifecycle]:
    d = tmp_path_factory.mktemp("lifecycle")
    for name in ("keyd", "acquirer"):
        if not pki.cert(name)[0].exists():
            pki.ca.issue(name, dns=["localhost"], ips=["127.0.0.1"])
    kport, vport, aport, admin_port = free_ports(4)
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
    allowlist = d / "allowlist.toml"
    allowlist.write_text(
        f"""[[destination]]
name = "acquirer"
url = "https://localhost:{aport}/v1/authorizations"
methods = ["POST"]
replacements = ["card_number", "card_expiry"]
accounts = ["*"]
ca_file = "{pki.ca_file}"
[destination.placements]
card_number = {{ json = "/card/number" }}
card_expiry = {{ json_month = "/card/exp_month", json_year = "/card/exp_year" }}
"""
    )
    vcert, vkey = pki.cert("vault")
    vconf = d / "vault.toml"
    vconf.write_text(
        f'profile = "development"\n[server]\nport = {vport}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[admin]\nport = {admin_port}\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "vault.db"}"\n[audit]\ndirectory = "{d / "audit"}"\n'
        f'[keyservice]\nurl = "https://localhost:{kport}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[forwarding]\nallowlist_file = "{allowlist}"\n'
        # One data key per card, so that every card is a stored key to move; unwrapped
        # keys cached 1 s only, so that a key forced back under v1 is unwrapped again.
        "[datakeys]\nmax_uses = 1\ncache_ttl = 1\n"
        "[limits]\nsecret_rate = 100000.0\nsecret_burst = 100000.0\n"
    )  # fmt: skip
    r = cli("accounts", "create", "--config", str(vconf), "--name", "t")
    assert r.returncode == 0, r.stderr
    sk = next(
        line.split()[-1] for line in r.stdout.splitlines() if line.startswith("secret (test)")
    )
    acert, akey = pki.cert("acquirer")
    alog = (d / "acquirer.log").open("wb")
    acq = subprocess.Popen(
        [sys.executable, "-m", "examples.acquirer", "--host", "127.0.0.1", "--port", str(aport),
         "--cert", str(acert), "--key", str(akey), "--state", str(d / "acquirer")],
        cwd=ROOT, stdout=alog, stderr=alog,
    )  # fmt: skip
    admin_cert, admin_key = pki.cert("admin")
    env = {
        "CARDVAULT_KEYSERVICE_URL": f"https://localhost:{kport}",
        "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{admin_port}",
        "CARDVAULT_CA_BUNDLE": str(pki.ca_file),
        "CARDVAULT_ADMIN_CERT": str(admin_cert),
        "CARDVAULT_ADMIN_KEY": str(admin_key),
    }
    shares = [d / "shares" / f"custodian-{i}.share" for i in (1, 2, 3)]
    try:
        wait_for_port(aport, acq)
        with keyservice_and_vault(kconf, kport, vconf, vport, d):
            for n, share in enumerate(shares[:2], start=1):
                r = cli("keyservice", "unseal", "--share-file", str(share), "--url", env[
                    "CARDVAULT_KEYSERVICE_URL"], "--ca-bundle", str(pki.ca_file), "--cert",
                    str(admin_cert), "--key", str(admin_key), "--json")  # fmt: skip
                assert r.returncode == 0, r.stderr
                # --json: the key service's answer as it gave it (2 of 3 unseal).
                assert json.loads(r.stdout) == (
                    {"sealed": True, "progress": 1, "threshold": 2}
                    if n == 1
                    else {"sealed": False, "progress": 0, "threshold": 2}
                )
            wait_for_port(admin_port)
            yield Lifecycle(
                d,
                f"https://localhost:{vport}",
                sk,
                shares,
                env,
                d / "keyd.db",
                d / "vault.db",
                f"https://localhost:{aport}/v1/authorizations",
            )
    finally:
        acq.terminate()
        acq.wait(10)
        alog.close()


def client(pki: Pki) -> httpx.Client:
    return httpx.Client(verify=client_context(pki.ca_file), timeout=30)


def tokenize(http: httpx.Client, life: Lifecycle, number: str) -> dict[str, Any]:
    r = http.post(
        f"{life.url}/v1/payment_methods",
        data={"type": "card", "card[number]": number, "card[exp_month]": "12",
              "card[exp_year]": "2034"},
        headers={"authorization": f"Bearer {life.sk}"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def forward(http: httpx.Client, life: Lifecycle, pm: str) -> httpx.Response:
    return http.post(
        f"{life.url}/v1/forwarding/requests",
        data={
            "payment_method": pm,
            "url": life.acquirer_url,
            "request[body]": json.dumps({"amount": 100, "currency": "usd",
                                         "card": {"number": "", "exp_month": "", "exp_year": ""}}),
            "replacements[0]": "card_number",
            "replacements[1]": "card_expiry",
            "request[headers][0][name]": "Content-Type",
            "request[headers][0][value]": "application/json",
        },
        headers={"authorization": f"Bearer {life.sk}"},
    )  # fmt: skip


def killed_midway(life: Lifecycle, done: int, *args: str) -> list[dict[str, Any]]:
    """``cardvault keys reencrypt ARGS`` at a slow pace, killed with SIGKILL once it has
    moved ``done`` items; the JSON lines it printed."""
    job = subprocess.Popen(
        [sys.executable, "-m", "cardvault", "keys", "reencrypt", *args,
         "--rate", "150", "--batch-size", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(life), cwd=life.dir,
    )  # fmt: skip
    assert job.stdout is not None
    lines = []
    for raw in job.stdout:
        lines.append(json.loads(raw))
        if lines[-1]["event"] == "batch" and lines[-1]["done"] >= done:
            break
    job.send_signal(signal.SIGKILL)
    job.wait(10)
    return lines


class Traffic:
    """Live traffic in a thread while a job runs: tokenize a card, then forward it or
    (every other time) one of ``olds``; every error is counted."""

    def __init__(self, life: Lifecycle, pki: Pki, olds: list[str]) -> None:
        self.life, self.pki, self.olds = life, pki, olds
        self.made: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with client(self.pki) as http:
            i = 0
            while not self._stop.is_set():
                try:
                    pm = tokenize(http, self.life, NUMBERS[i % 4])["id"]
                    self.made.append(pm)
                    old = self.olds[(i * 7) % len(self.olds)]
                    fwd = forward(http, self.life, old if i % 2 else pm)
                    if fwd.status_code != 200:
                        self.errors.append(fwd.text)
                except Exception as exc:
                    self.errors.append(repr(exc))
                i += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(1.0)  # requests in flight as the job ended
        self._stop.set()
        self._thread.join(30)


def pan_keys(life: Lifecycle) -> int:
    """How many pan data keys the vault's table holds."""
    with sqlite3.connect(life.vault_db) as db:
        (n,) = db.execute("SELECT count(*) FROM data_keys WHERE kek = 'pan'").fetchone()
    return int(n)


def status(life: Lifecycle) -> dict[str, Any]:
    r = keys_cli(life, "status", "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def versions(st: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    return {row["version"]: row for row in st["keys"][name]["versions"]}


# The heaviest tests of the suite (a whole stack, thousands of cards, a scan of every
# file): a machine shared with other work has taken more than the default 300 s.
@pytest.mark.timeout(900)
def test_rotate_reencrypt_under_load_kill_resume_retire_destroy(life: Lifecycle, pki: Pki) -> None:
    with ThreadPoolExecutor(8) as pool, client(pki) as http:
        cards = list(pool.map(lambda i: tokenize(http, life, NUMBERS[i % 4])["id"], range(CARDS)))
    # The card to be left under v1 by force, after the destroy: its data key as stored now.
    with sqlite3.connect(life.vault_db) as db:
        victim_key, victim_wrapped = db.execute(
            "SELECT d.id, d.wrapped FROM payment_methods p JOIN data_keys d ON d.id = p.data_key_id"
            " WHERE p.id = ?", (cards[0],)
        ).fetchone()  # fmt: skip
    st = status(life)
    # Every card has a data key of its own, and so has every event (they are sealed
    # too, under pan data keys): what the vault reports is what its table holds.
    stored = pan_keys(life)
    assert stored >= CARDS
    assert versions(st, "pan")[1] == {"version": 1, "state": "active", "stored_keys": stored}

    r = keys_cli(life, "rotate", "pan")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["latest_version"] == 2
    # Retiring v1 is refused while stored keys use it.
    r = keys_cli(life, "retire", "pan", "1")
    assert r.returncode == 1
    assert "still use" in r.stderr

    # Live traffic through the whole job: tokenize and forward, count every error.
    with Traffic(life, pki, cards) as traffic:
        # The job, killed with SIGKILL once it has moved some keys.
        lines = killed_midway(life, MIDWAY, "pan")
        assert lines[0]["event"] == "start"
        assert lines[0]["total"] >= stored
        assert lines[0]["resumed"] is False
        midway = status(life)
        job_state = midway["keys"]["pan"]["job"]
        assert job_state["finished"] is None and job_state["cursor"]
        assert 0 < versions(midway, "pan")[1]["stored_keys"] < stored

        # Resumed where it stopped: the same run, to the end.
        r = keys_cli(life, "reencrypt", "pan", "--rate", "2000", "--batch-size", "50")
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert events[0]["resumed"] is True
        assert events[0]["done"] >= job_state["moved"]
        assert events[-1]["event"] == "done"
        assert {e["run"] for e in events[1:]} == {job_state["run"]}
    assert traffic.errors == []
    assert len(traffic.made) > 0
    made = traffic.made

    # Idempotent: a second run finds nothing to move.
    r = keys_cli(life, "reencrypt", "pan")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
    st = status(life)
    pan = versions(st, "pan")
    assert pan[1] == {"version": 1, "state": "decrypt_only", "stored_keys": 0}
    assert pan[2]["state"] == "active"
    assert pan[2]["stored_keys"] == pan_keys(life) >= stored + len(made)

    r = keys_cli(life, "retire", "pan", "1")
    assert r.returncode == 0, r.stderr
    assert versions(status(life), "pan")[1]["state"] == "retired"

    # A copy of keyd's database taken before the destruction.
    backup = life.dir / "keyd-before-destroy.db"
    with sqlite3.connect(life.keyd_db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    with sqlite3.connect(backup) as db:
        (sealed_v1,) = db.execute(
            "SELECT sealed FROM keks WHERE name = 'pan' AND version = 1"
        ).fetchone()

    # Destroy: k-of-n custodian approval with the unseal shares (2 of 3).
    r = keys_cli(life, "destroy", "pan", "1", "--share-file", str(life.shares[2]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) | {"object": None} == {
        "object": None, "name": "pan", "version": 1, "destroyed": False, "progress": 1,
        "threshold": 2,
    }  # fmt: skip
    assert versions(status(life), "pan")[1]["state"] == "retired"
    r = keys_cli(life, "destroy", "pan", "1", "--share-file", str(life.shares[0]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["destroyed"] is True
    assert versions(status(life), "pan")[1]["state"] == "destroyed"

    # The material is gone from the live database (file and WAL), not from the copy.
    with sqlite3.connect(life.keyd_db) as db:
        assert db.execute(
            "SELECT count(*) FROM keks WHERE name = 'pan' AND version = 1"
        ).fetchone() == (0,)
    live = b"".join(p.read_bytes() for p in life.keyd_db.parent.glob("keyd.db*") if p.is_file())
    assert bytes(sealed_v1) not in live
    assert bytes(sealed_v1) in backup.read_bytes()
    # Destroyed twice is the same answer, not an error.
    assert json.loads(
        keys_cli(life, "destroy", "pan", "1", "--share-file", str(life.shares[1])).stdout
    )["destroyed"]

    # A card forced back under the destroyed version fails with a clear error...
    with sqlite3.connect(life.vault_db) as db:
        db.execute(
            "UPDATE data_keys SET wrapped = ?, kek_version = 1 WHERE id = ?",
            (victim_wrapped, victim_key),
        )
    time.sleep(1.5)  # the vault's cache of unwrapped keys (1 s here)
    with client(pki) as http:
        r = forward(http, life, cards[0])
        assert r.status_code == 410, r.text
        error = r.json()["error"]
        assert error["code"] == "key_version_unavailable"
        assert error["type"] == "invalid_request_error"
        assert "destroyed" in error["message"]
        # ... and every other card, old and new, still forwards.
        others = [*cards[1:], *made]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda pm: forward(http, life, pm).status_code, others))
    assert codes == [200] * len(others)
    assert versions(status(life), "pan")[1]["stored_keys"] == 1  # the one forced there
    # A walk meets that key: it can never move, so it is skipped and counted, and the
    # run still ends (a new run: the rotation below makes v3 the target).
    assert keys_cli(life, "rotate", "pan").returncode == 0
    r = keys_cli(life, "reencrypt", "pan", "--rate", "100000", "--batch-size", "1000")
    assert r.returncode == 0, r.stderr
    job = status(life)["keys"]["pan"]["job"]
    assert (job["finished"] is not None, job["unreadable"]) == (True, 1)
    assert versions(status(life), "pan")[2]["stored_keys"] == 0

    # Audit: one record per batch and one per run.
    audit = "".join(
        p.read_text(errors="replace") for p in (life.dir / "audit").rglob("*") if p.is_file()
    )
    assert "keys.reencrypt.batch" in audit
    assert "keys.reencrypt.completed" in audit


def test_fingerprints_stay_comparable_across_a_fingerprint_rotation(
    life: Lifecycle, pki: Pki
) -> None:
    with client(pki) as http:
        before = tokenize(http, life, "5555555555554444")["card"]["fingerprint"]
        r = keys_cli(life, "rotate", "fingerprint")
        assert r.returncode == 0, r.stderr
        after = tokenize(http, life, "5555555555554444")["card"]["fingerprint"]
    assert after == before
    fp = versions(status(life), "fingerprint")
    assert fp[1]["fingerprints"] == "in use"
    assert fp[1]["state"] == "decrypt_only"
    assert fp[2]["state"] == "active"
    # The version fingerprints are made under cannot be retired; fingerprints are no
    # stored keys to re-encrypt.
    r = keys_cli(life, "retire", "fingerprint", "1")
    assert r.returncode == 1
    assert "derives fingerprints under v1" in r.stderr
    assert keys_cli(life, "reencrypt", "fingerprint").returncode == 2


def test_the_admin_key_endpoints_refuse_hostile_bodies_and_change_nothing(
    life: Lifecycle, pki: Pki
) -> None:
    """The re-encryption endpoints are on mutual TLS for the admin identity only, read a
    small JSON object of integers, bound every number, and never echo a card number."""
    admin = client_context(pki.ca_file, client_cert=pki.cert("admin"))
    other = client_context(pki.ca_file, client_cert=pki.cert("vault"))
    base = life.env["CARDVAULT_VAULT_ADMIN_URL"]
    with httpx.Client(verify=admin, timeout=30) as http:
        state = http.get(f"{base}/v1/admin/keys").json()
        future = int(time.time()) + 3600
        cases: list[tuple[str, bytes, int]] = [
            ("pan/reencrypt_data", b"not json", 400),
            ("pan/reencrypt_data", b"[1, 2]", 400),
            ("pan/reencrypt_data", b'{"4242424242424242": 1, "before": 1}', 400),
            ("pan/reencrypt_data", b'{"before": true}', 400),
            ("pan/reencrypt_data", b'{"before": "4242424242424242"}', 400),
            ("pan/reencrypt_data", b"{}", 400),
            ("pan/reencrypt_data", b'{"before": %d}' % future, 400),
            ("pan/reencrypt_data", b'{"before": -1}', 400),
            ("pan/reencrypt_data", b'{"before": 1, "batch_size": 0}', 400),
            ("pan/reencrypt_data", b'{"before": 1, "batch_size": 1000000000}', 400),
            ("pan/reencrypt_data", b'{"before": 1e400}', 400),
            ("pan/reencrypt_data", b'{"before": 1, "pad": "' + b"x" * 8000 + b'"}', 413),
            ("fingerprint/reencrypt_data", b'{"before": 1}', 404),
            ("4242424242424242/reencrypt_data", b'{"before": 1}', 404),
            ("pan/reencrypt", b'{"target_version": 0}', 400),
            ("pan/reencrypt", b'{"target_version": 2, "batch_size": -5}', 400),
            ("pan/reencrypt", b"[" * 4000, 400),
            ("pan/reencrypt", b"[" * 5000, 413),
        ]
        for path, body, code in cases:
            r = http.post(f"{base}/v1/admin/keys/{path}", content=body,
                          headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == code, (path, body[:60], r.text)
            assert "4242424242424242" not in r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert r.headers["strict-transport-security"].startswith("max-age=")
        assert http.get(f"{base}/v1/admin/keys").json() == state
    # Another identity of the same CA: refused, and nothing runs.
    with httpx.Client(verify=other, timeout=30) as http:
        r = http.post(f"{base}/v1/admin/keys/pan/reencrypt_data", json={"before": 1})
        assert r.status_code == 403, r.text
    # No client certificate at all: no TLS session.
    with httpx.Client(verify=client_context(pki.ca_file), timeout=30) as http:
        with pytest.raises(httpx.TransportError):
            http.post(f"{base}/v1/admin/keys/pan/reencrypt_data", json={"before": 1})
