from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from typer.testing import CliRunner

from cardvault.cli import _register, app
from cardvault.transport.certs import init_ca, load_ca


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_makes_an_ec_p256_ca_with_0600_files(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    assert mode(ca.cert_path) == 0o600
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    cert = load(ca.cert_path)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0


def test_init_ca_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    with pytest.raises(FileExistsError):
        init_ca(tmp_path)


def test_server_certificate_has_non_critical_san_and_at_most_90_days(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    issued = ca.issue("vault", dns=["localhost", "vault.internal"], ips=["127.0.0.1"])
    cert = load(issued.cert_path)
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical is False
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "vault.internal"]
    assert [str(i) for i in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=90, minutes=5)
    assert cert.subject.rfc4514_string() == "CN=vault"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert mode(issued.key_path) == 0o600
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_client_certificate_carries_the_service_identity(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    cert = load(ca.issue("vault-client", client_identity="vault").cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cardvault/vault"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ExtendedKeyUsageOID.SERVER_AUTH not in eku


def test_certificates_verify_against_the_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    cert = load(ca.issue("x", dns=["localhost"]).cert_path)
    cert.verify_directly_issued_by(load(ca.cert_path))
    other = init_ca(tmp_path / "other")
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(load(other.cert_path))


def test_reissue_before_expiry_replaces_key_and_certificate(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    first = ca.issue("vault", dns=["localhost"])
    first_key = first.key_path.read_bytes()
    second = load_ca(tmp_path).issue("vault", dns=["localhost"])
    assert second.key_path.read_bytes() != first_key
    assert second.certificate.serial_number != first.certificate.serial_number
    assert load(second.cert_path).serial_number == second.certificate.serial_number


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dns": []},
        {"dns": ["localhost"], "days": 400},
        {"client_identity": "bad/identity"},
    ],
)
def test_issue_refuses_bad_requests(tmp_path: Path, kwargs: dict[str, object]) -> None:
    ca = init_ca(tmp_path)
    with pytest.raises(ValueError):
        ca.issue("x", **kwargs)  # type: ignore[arg-type]


def test_cli_init_and_issue(tmp_path: Path) -> None:
    _register()
    runner = CliRunner()
    d = tmp_path / "pki"
    r = runner.invoke(app, ["certs", "init", "--dir", str(d)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "certs",
            "issue",
            "--dir",
            str(d),
            "--name",
            "vault",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--client",
            "vault",
        ],
    )
    assert r.exit_code == 0, r.output
    cert = load(d / "vault.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cardvault/vault"]
    assert runner.invoke(app, ["certs", "init", "--dir", str(d)]).exit_code == 1
    assert (
        runner.invoke(
            app, ["certs", "issue", "--dir", str(tmp_path / "none"), "--name", "x", "--dns", "a"]
        ).exit_code
        == 1
    )
