"""Test helpers: free ports, a test PKI, real servers in threads and in processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardvault.files import write_private
from cardvault.transport.certs import CertificateAuthority, init_ca
from cardvault.transport.server import Listener, serve

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` different free ports. (Calls to :func:`free_port` one after another may
    return the same port twice: each closes its socket before the next one binds.)"""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Pki:
    """A deployment CA with the certificates the tests need, plus a rogue CA."""

    dir: Path
    ca: CertificateAuthority
    rogue: CertificateAuthority

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_path

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


def make_pki(directory: Path) -> Pki:
    ca = init_ca(directory)
    rogue = init_ca(directory / "rogue", common_name="rogue CA")
    ca.issue("vault", dns=["localhost"], ips=["127.0.0.1"], client_identity="vault")
    ca.issue("admin", client_identity="admin")
    ca.issue("shop", client_identity="shop")
    rogue.issue("rogue-admin", client_identity="admin", out_dir=directory)
    return Pki(directory, ca, rogue)


def self_signed(directory: Path, name: str = "selfsigned") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert_path, key_path


class ThreadedServers:
    """Real uvicorn listeners (real sockets, real TLS) on an event loop in a thread."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.listeners = listeners
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.listeners, ready=self._ready.set, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ThreadedServers:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("servers did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


@contextlib.contextmanager
def cardvault_process(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m cardvault ARGS`` as a real child process; stop it afterwards."""
    full_env = {**os.environ, **(env or {})}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardvault", *args], stdout=fh, stderr=fh, env=full_env
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cardvault ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def keyservice_and_vault(
    keyd_config: Path, keyd_port: int, vault_config: Path, vault_port: int, logs: Path
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """The key service, then the vault, as real processes (yielded in that order); both
    stopped afterwards."""
    with cardvault_process(
        ["keyservice", "serve", "--config", str(keyd_config)], log=logs / "keyd.log"
    ) as keyd:
        wait_for_port(keyd_port, keyd)
        with cardvault_process(
            ["vault", "serve", "--config", str(vault_config)], log=logs / "vault.log"
        ) as vault:
            wait_for_port(vault_port, vault)
            yield keyd, vault
