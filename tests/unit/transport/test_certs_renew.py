"""Certificates that renew: ``CertificateAuthority.renew_if_due`` (used by every start
of ``cardvault up`` and by ``cardvault certs renew``)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from cardvault.transport.certs import RENEW_WITHIN_DAYS, init_ca


def names(path: Path) -> tuple[list[str], list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        sans.get_values_for_type(x509.DNSName),
        [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
        sans.get_values_for_type(x509.UniformResourceIdentifier),
    )


def days_left(path: Path) -> float:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def test_a_current_certificate_is_left_alone(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    issued = ca.issue("vault", dns=["localhost"], client_identity="vault", out_dir=tmp_path)
    before = (issued.cert_path.read_bytes(), issued.key_path.read_bytes())
    assert ca.renew_if_due(issued.cert_path) is None
    assert (issued.cert_path.read_bytes(), issued.key_path.read_bytes()) == before


def test_one_due_expired_or_from_another_ca_is_reissued_with_its_names_and_a_new_key(
    tmp_path: Path,
) -> None:
    ca = init_ca(tmp_path / "ca")
    other = init_ca(tmp_path / "other", common_name="another CA")
    cases = {
        "due": ca.issue("due", dns=["localhost"], ips=["127.0.0.1", "::1"],
                        client_identity="vault", days=RENEW_WITHIN_DAYS - 5, out_dir=tmp_path),
        "expired": ca.issue("expired", dns=["vault.internal"], days=-3, out_dir=tmp_path),
        "foreign": other.issue("foreign", client_identity="admin", out_dir=tmp_path),
    }  # fmt: skip
    for name, old in cases.items():
        old_key = old.key_path.read_bytes()
        old_names = names(old.cert_path)
        renewed = ca.renew_if_due(old.cert_path)
        assert renewed is not None, name
        assert renewed.cert_path == old.cert_path
        assert renewed.key_path.read_bytes() != old_key
        assert names(renewed.cert_path) == old_names
        assert days_left(renewed.cert_path) > 80
        renewed.certificate.verify_directly_issued_by(ca.certificate)
        assert ca.renew_if_due(renewed.cert_path) is None


def test_certs_renew_renews_what_is_due_and_says_so(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    due = ca.issue("due", dns=["localhost"], days=10, out_dir=tmp_path)
    current = ca.issue("current", dns=["localhost"], out_dir=tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "cardvault", "certs", "renew", "--dir", str(tmp_path / "ca"),
         str(due.cert_path), str(current.cert_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "due.pem: renewed" in text
    assert "current.pem: current" in text
    assert days_left(due.cert_path) > 80
