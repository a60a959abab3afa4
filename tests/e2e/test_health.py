"""Health that tells the truth, with real processes: /healthz (the process serves) and
/readyz (it can work), a service whose audit log fails stops and exits 74 for its
supervisor to restart it, and a vault refuses to start on a tampered audit log."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, cardvault_process, cli, free_ports, wait_for_port
from stack import create_account

AUDIT_FAILED_EXIT = 74
CARD = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2031",
}


# --- a filesystem that fills up -------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_kib: int = 512) -> Iterator[bool]:
    """``path`` on a tmpfs of its own (as root): True; False when none can be mounted
    (then the tests make the directory read-only instead, see :func:`fill`)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        options = f"size={size_kib}k,mode=0700"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        mounted = done.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
        else:
            os.chmod(path, 0o700)


def fill(path: Path, mounted: bool) -> None:
    """Make writing under ``path`` fail: fill its tmpfs to the last byte, or (without one,
    not as root) make the directory read-only, which fails every new file there."""
    if not mounted:
        assert os.geteuid() != 0, "root writes to a read-only directory: no honest failure"
        os.chmod(path, 0o500)
        return
    with open(path / "filler", "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    fh.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break


# --- a key service and a vault ----------------------------------------------------------


@dataclass
class Services:
    dir: Path
    url: str
    keyd_url: str
    vault_config: Path
    keyd: subprocess.Popen[bytes]
    vault: subprocess.Popen[bytes]
    secret: str

    def log(self) -> str:
        return (self.dir / "vault.log").read_text(errors="replace")


@contextlib.contextmanager
def services(
    d: Path, pki: Pki, *, audit: Path, keyd_audit: Path | None = None, every: int = 1000
) -> Iterator[Services]:
    """The development key service and the vault as real processes, the vault's audit
    log in ``audit`` (and the key service's in ``keyd_audit``)."""
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    kport, vport = free_ports(2)
    kcert, kkey = pki.cert("keyd")
    kconf = d / "keyd.toml"
    kconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {kport}\ncert_file = "{kcert}"\nkey_file = "{kkey}"\n'
        f'client_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "keyd.db"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{d / "root.key"}"\n'
        + (
            f'[audit]\ndirectory = "{keyd_audit}"\ncheckpoint_every = {every}\n'
            if keyd_audit
            else ""
        )
    )
    assert cli("keyservice", "init", "--config", str(kconf)).returncode == 0
    vcert, vkey = pki.cert("vault")
    vconf = d / "vault.toml"
    vconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {vport}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[store]\nurl = "sqlite:///{d / "vault.db"}"\n'
        f'[audit]\ndirectory = "{audit}"\nadmin_directory = "{d / "vault-admin"}"\n'
        f"checkpoint_every = {every}\n"
        f'[keyservice]\nurl = "https://localhost:{kport}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vcert}"\nkey_file = "{vkey}"\n'
    )
    account = create_account(vconf)
    with cardvault_process(
        ["keyservice", "serve", "--config", str(kconf)], log=d / "keyd.log"
    ) as keyd:
        wait_for_port(kport, keyd)
        with cardvault_process(
            ["vault", "serve", "--config", str(vconf)], log=d / "vault.log"
        ) as vault:
            wait_for_port(vport, vault)
            yield Services(
                d,
                f"https://localhost:{vport}",
                f"https://localhost:{kport}",
                vconf,
                keyd,
                vault,
                account["sk"],
            )


def http(pki: Pki, identity: str | None = None) -> httpx.Client:
    pair = pki.cert(identity) if identity else None
    return httpx.Client(
        verify=client_context(pki.ca_file, client_cert=pair), trust_env=False, timeout=10
    )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the process did not exit within {timeout} s") from None


# --- readiness --------------------------------------------------------------------------


@pytest.mark.slow
def test_readyz_follows_the_key_service_and_healthz_only_the_process(
    tmp_path: Path, pki: Pki
) -> None:
    with services(tmp_path, pki, audit=tmp_path / "audit") as s, http(pki) as c:
        assert c.get(f"{s.url}/healthz").json() == {"status": "ok"}
        ready = c.get(f"{s.url}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "status": "ready",
            "checks": {"store": "ok", "keyservice": "ok", "audit": "ok"},
        }
        assert ready.headers["cache-control"] == "no-store"
        with http(pki, "admin") as admin:
            assert admin.post(f"{s.keyd_url}/v1/seal").status_code == 200
        time.sleep(1.1)  # past the one second an answer is reused
        sealed = c.get(f"{s.url}/readyz")
        assert sealed.status_code == 503
        error = sealed.json()["error"]
        assert error["code"] == "service_unavailable"
        assert "keyservice sealed" in error["message"]
        assert "Retry-After" in sealed.headers
        assert c.get(f"{s.url}/healthz").status_code == 200  # alive, not ready
        s.keyd.terminate()
        s.keyd.wait(10)
        time.sleep(1.1)
        gone = c.get(f"{s.url}/readyz")
        assert gone.status_code == 503
        assert "keyservice unreachable" in gone.json()["error"]["message"]


# --- a failed audit log: 503, not ready, then exit 74 -----------------------------------


@pytest.mark.slow
def test_a_vault_whose_audit_log_fails_answers_503_is_not_ready_and_exits_74(
    tmp_path: Path, pki: Pki
) -> None:
    audit = tmp_path / "audit"
    with small_filesystem(audit) as mounted:
        # Without a tmpfs, a read-only directory fails the audit.head of each checkpoint.
        every = 1000 if mounted else 1
        with services(tmp_path, pki, audit=audit, every=every) as s, http(pki) as c:
            auth = {"Authorization": f"Bearer {s.secret}"}
            assert c.post(f"{s.url}/v1/payment_methods", data=CARD, headers=auth).status_code == 200
            assert c.get(f"{s.url}/readyz").status_code == 200
            fill(audit, mounted)
            # The log's last page may still hold a few records: until it is full, they fit.
            for _ in range(50):
                r = c.post(f"{s.url}/v1/payment_methods", data=CARD, headers=auth)
                if r.status_code != 200:
                    break
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "audit_unavailable"
            failed_at = time.monotonic()
            if mounted:  # (a broken log, below, stops the vault at once)
                ready = c.get(f"{s.url}/readyz")
                assert ready.status_code == 503
                assert "audit failed" in ready.json()["error"]["message"]
                assert c.get(f"{s.url}/healthz").status_code == 200
            assert wait_exit(s.vault, 30) == AUDIT_FAILED_EXIT
            assert time.monotonic() - failed_at < 30
            assert "audit log failed" in s.log()
            # Nothing listens any more: the supervisor's restart is what comes next.
            with pytest.raises(httpx.ConnectError):
                c.get(f"{s.url}/healthz")


@pytest.mark.slow
def test_a_key_service_whose_audit_log_fails_exits_74(tmp_path: Path, pki: Pki) -> None:
    audit = tmp_path / "keyd-audit"
    with small_filesystem(audit) as mounted:
        every = 1000 if mounted else 1
        with (
            services(tmp_path, pki, audit=tmp_path / "audit", keyd_audit=audit, every=every) as s,
            http(pki, "vault") as vault,
        ):
            assert vault.get(f"{s.keyd_url}/readyz").json()["checks"] == {
                "store": "ok",
                "seal": "unsealed",
                "audit": "ok",
            }
            fill(audit, mounted)
            for _ in range(50):
                r = vault.post(f"{s.keyd_url}/v1/keys/pan/datakey")
                if r.status_code != 200:
                    break
            assert r.status_code == 503, r.text
            if mounted:
                ready = vault.get(f"{s.keyd_url}/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["audit"] == "failed"
            assert wait_exit(s.keyd, 30) == AUDIT_FAILED_EXIT


# --- start-up refuses a tampered log, and repair brings it back -------------------------


@pytest.mark.slow
def test_the_vault_refuses_a_tampered_log_until_it_is_repaired(tmp_path: Path, pki: Pki) -> None:
    audit = tmp_path / "audit"
    with services(tmp_path, pki, audit=audit) as s, http(pki) as c:
        auth = {"Authorization": f"Bearer {s.secret}"}
        for _ in range(3):
            assert c.post(f"{s.url}/v1/payment_methods", data=CARD, headers=auth).status_code == 200
        s.vault.terminate()
        assert s.vault.wait(10) == 0
        log = audit / "audit.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        lines[1], lines[2] = lines[2], lines[1]  # two records swapped mid-log
        log.write_bytes(b"".join(lines))
        with cardvault_process(
            ["vault", "serve", "--config", str(s.vault_config)], log=tmp_path / "refused.log"
        ) as refused:
            assert refused.wait(30) == 2
        said = " ".join((tmp_path / "refused.log").read_text().split())  # (wrapped lines)
        assert "reordered: line 2" in said
        assert f"cardvault audit repair {log}" in said
        repaired = cli("audit", "repair", str(log), "--yes")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert "verify: ok" in repaired.stdout
        with cardvault_process(
            ["vault", "serve", "--config", str(s.vault_config)], log=tmp_path / "again.log"
        ) as again:
            port = int(s.url.rsplit(":", 1)[1])
            wait_for_port(port, again)
            assert c.post(f"{s.url}/v1/payment_methods", data=CARD, headers=auth).status_code == 200
        verified = cli("audit", "verify", str(log))
        assert verified.returncode == 0, verified.stdout
        assert "audit.repaired" in log.read_text()
