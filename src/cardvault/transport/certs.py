"""A deployment CA and the certificates it issues, made with ``cryptography``.

For local stacks and tests; production may bring certificates from its own PKI.

What is made, and why it looks the way it does:

* Keys are EC P-256: fast handshakes, accepted by every TLS scanner and client.
* Leaf certificates live at most 90 days by default (CA/B Forum direction, and what
  scanners like sslyze accept); the CA lives ten years and may sign leaves only
  (``path_length=0``).
* The subjectAltName extension is *not* critical and the subject carries a CN: a
  critical SAN with a non-empty subject is a profile error that scanners flag (trustme's
  certificates fail sslyze for this and for their ~1,000-year lifetime).
* A client certificate carries the service identity as a URI SAN
  ``spiffe://cardvault/<identity>`` and the clientAuth extended key usage; servers
  authorize by that identity (see :mod:`cardvault.transport.identity`).
* Every private key file is written 0600, atomically (write to a temporary file, then
  rename), so a reissue never leaves a half-written key behind: by
  :func:`cardvault.files.write_private`.

This module and :mod:`cardvault.transport.pins` are the only ones outside
:mod:`cardvault.crypto` that import ``cryptography.hazmat``: X.509 keys and
serialization have no other door in the library.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cardvault.files import write_private

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_LEAF_DAYS",
    "IDENTITY_PREFIX",
    "MAX_LEAF_DAYS",
    "RENEW_WITHIN_DAYS",
    "CertificateAuthority",
    "IssuedCertificate",
    "identity_uri",
    "init_ca",
    "load_ca",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
IDENTITY_PREFIX = "spiffe://cardvault/"
DEFAULT_LEAF_DAYS = 90
# Browsers and CA/B Forum rules cap public leaf lifetimes at 398 days; a deployment CA
# has no reason to exceed that either.
MAX_LEAF_DAYS = 397
#: A certificate is reissued (``cardvault up`` at every start, ``cardvault certs renew``)
#: once it has fewer days left than this; ``cardvault doctor tls`` reports it too.
RENEW_WITHIN_DAYS = 30
CA_DAYS = 3650
# Backdating absorbs small clock differences between hosts without making a
# certificate valid long before it was made.
_BACKDATE = dt.timedelta(minutes=5)


def identity_uri(identity: str) -> str:
    """The URI SAN that names a service identity: ``spiffe://cardvault/<identity>``."""
    if not identity or not all(c.isalnum() or c in "-_." for c in identity):
        raise ValueError("an identity is letters, digits, '-', '_' or '.'")
    return IDENTITY_PREFIX + identity


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCertificate:
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded deployment CA that can issue server and client certificates."""

    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    def issue(
        self,
        name: str,
        *,
        dns: list[str] | tuple[str, ...] = (),
        ips: list[str] | tuple[str, ...] = (),
        client_identity: str | None = None,
        days: int = DEFAULT_LEAF_DAYS,
        out_dir: Path | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue ``NAME.pem`` and ``NAME.key`` (0600) into ``out_dir`` (default: the CA's).

        With ``dns``/``ips`` the certificate serves TLS for those names (serverAuth);
        with ``client_identity`` it also authenticates as that identity (clientAuth and a
        ``spiffe://cardvault/<identity>`` URI SAN). Reissuing replaces both files.
        ``days`` may be negative or ``now`` in the future, for tests of expired and
        not-yet-valid certificates.
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError("a certificate name is a plain file name")
        if not dns and not ips and client_identity is None:
            raise ValueError("give at least one --dns, --ip or --client")
        if days > MAX_LEAF_DAYS:
            raise ValueError(f"a leaf certificate may live at most {MAX_LEAF_DAYS} days")
        now = now or dt.datetime.now(dt.UTC)
        start, end = now - _BACKDATE, now + dt.timedelta(days=days)
        if end <= start:
            start, end = end - dt.timedelta(days=1), end

        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = []
        if dns or ips:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client_identity is not None:
            sans.append(x509.UniformResourceIdentifier(identity_uri(client_identity)))
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)

        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(self.key, hashes.SHA256())
        target = out_dir or self.directory
        cert_path, key_path = target / f"{name}.pem", target / f"{name}.key"
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCertificate(cert_path, key_path, cert)

    def renew_if_due(
        self,
        cert_path: Path,
        *,
        within_days: int = RENEW_WITHIN_DAYS,
        days: int = DEFAULT_LEAF_DAYS,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate | None:
        """Reissue the certificate at ``cert_path`` (``NAME.pem`` beside ``NAME.key``)
        with the same names and identity and a new key, when it expires within
        ``within_days`` or was not issued by this CA; None when it is current."""
        now = now or dt.datetime.now(dt.UTC)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        left = cert.not_valid_after_utc - now
        try:
            cert.verify_directly_issued_by(self.certificate)
            ours = True
        except (ValueError, TypeError, InvalidSignature):
            ours = False
        if ours and left > dt.timedelta(days=within_days):
            return None
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        identities = [
            u.removeprefix(IDENTITY_PREFIX)
            for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(IDENTITY_PREFIX)
        ]
        return self.issue(
            cert_path.stem,
            dns=sans.get_values_for_type(x509.DNSName),
            ips=[str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
            client_identity=identities[0] if identities else None,
            days=days,
            out_dir=cert_path.parent,
            now=now,
        )


def init_ca(
    directory: Path, *, common_name: str = "cardvault deployment CA"
) -> CertificateAuthority:
    """Create a new deployment CA in ``directory`` (``ca.pem``, ``ca.key``, both 0600).

    Refuses to overwrite an existing CA: replacing it would orphan every certificate it
    issued. Delete the files deliberately to start over.
    """
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"a CA already exists in {directory}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(directory, cert, key)


def load_ca(directory: Path) -> CertificateAuthority:
    """Load the CA in ``directory``; raises FileNotFoundError when there is none."""
    cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    return CertificateAuthority(directory, cert, key)
