"""``cardvault doctor tls`` against real listeners: a well-configured one is compliant;
each weak one (TLS 1.0, an RSA-1024 key, an expired certificate, a certificate of another
CA, no HSTS) is reported with its reason, and the command exits 1."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cardvault.files import write_private
from cardvault.transport.tls import server_context
from helpers import Pki

HSTS = "max-age=63072000; includeSubDomains"


def rsa_1024(pki: Pki, directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost with a 1024-bit RSA key, issued by the test CA."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the weak key under test)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=60))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(pki.ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / "rsa1024.pem", directory / "rsa1024.key"
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


@contextmanager
def listener(
    cert: tuple[Path, Path], *, hsts: bool = True, tls10: bool = False, legacy: bool = False
) -> Iterator[int]:
    """An HTTPS server on a free port of 127.0.0.1: the port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            if hsts:
                self.send_header("Strict-Transport-Security", HSTS)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_HEAD = do_GET

        def log_message(self, *_: object) -> None:
            pass

    if tls10 or legacy:
        # A weak configuration: Python's defaults at OpenSSL 3's lowest security level.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if tls10:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    else:
        # Every listener of cardvault's: the shared transport's context.
        ctx = server_context(cert[0], cert[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cardvault", "doctor", "tls", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
def test_doctor_reports_each_weak_listener_with_its_reason(tmp_path: Path, pki: Pki) -> None:
    good = pki.ca.issue("good", dns=["localhost"], out_dir=tmp_path)
    expired = pki.ca.issue("expired", dns=["localhost"], days=-2, out_dir=tmp_path)
    foreign = pki.rogue.issue("foreign", dns=["localhost"], out_dir=tmp_path)
    pair = lambda c: (c.cert_path, c.key_path)  # noqa: E731
    with (
        listener(pair(good)) as ok_port,
        listener(pair(good), tls10=True) as tls10_port,
        listener(rsa_1024(pki, tmp_path), legacy=True) as rsa_port,
        listener(pair(expired)) as expired_port,
        listener(pair(foreign)) as foreign_port,
        listener(pair(good), hsts=False) as no_hsts_port,
    ):
        ports = {
            "ok": ok_port, "tls10": tls10_port, "rsa1024": rsa_port,
            "expired": expired_port, "foreign": foreign_port, "no_hsts": no_hsts_port,
        }  # fmt: skip
        urls = [a for port in ports.values() for a in ("--url", f"https://localhost:{port}")]
        r = doctor(*urls, "--ca-file", str(pki.ca_file), "--json")
        table = doctor(*urls, "--ca-file", str(pki.ca_file))
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["compliant"] is False
    found = {e["endpoint"]["port"]: e for e in report["endpoints"]}
    problems = {name: " | ".join(found[port]["problems"]) for name, port in ports.items()}
    assert found[ports["ok"]]["compliant"] is True, problems["ok"]
    assert found[ports["ok"]]["certificate"]["accepted_ca"] is True
    assert found[ports["ok"]]["protocols"] == ["TLS 1.2", "TLS 1.3"]
    assert "accepts TLS 1.0" in problems["tls10"]
    assert "RSA-1024 key: below 2048 bits" in problems["rsa1024"]
    assert "certificate expired on" in problems["expired"]
    assert "does not chain to an accepted CA (issuer CN=rogue CA)" in problems["foreign"]
    assert "no Strict-Transport-Security header" in problems["no_hsts"]
    for name in ("tls10", "rsa1024", "expired", "foreign", "no_hsts"):
        assert found[ports[name]]["compliant"] is False, name
    # sslyze's own verdict against the Mozilla profile is carried along.
    assert "Mozilla intermediate:" in problems["tls10"]
    # The table for people says the same, and exits the same.
    assert table.returncode == 1
    assert "5 endpoint(s) drift" in table.stdout


def test_doctor_refuses_what_is_not_an_https_url(tmp_path: Path) -> None:
    r = doctor("--url", "http://localhost:1")
    assert r.returncode == 2
    assert "not an https:// URL" in r.stderr


@pytest.mark.parametrize("profile", ["old", "x"])
def test_doctor_refuses_an_unknown_profile(profile: str) -> None:
    r = doctor("--url", "https://localhost:1", "--profile", profile)
    assert r.returncode == 2
