from __future__ import annotations

import pytest

from cardvault.errors import ClientCertificateRequired, IdentityNotAllowed
from cardvault.transport.identity import identity_from_peercert, require_identity


def scope(identity: str | None) -> dict[str, object]:
    return {"extensions": {"tls": {"client_identity": identity}}}


def test_identity_comes_from_the_single_cardvault_uri_san() -> None:
    cert = {"subjectAltName": (("DNS", "x"), ("URI", "spiffe://cardvault/vault"))}
    assert identity_from_peercert(cert) == "vault"


@pytest.mark.parametrize(
    "sans",
    [
        (),
        (("URI", "spiffe://other/vault"),),
        (("URI", "spiffe://cardvault/a"), ("URI", "spiffe://cardvault/b")),
        (("DNS", "spiffe://cardvault/vault"),),
    ],
)
def test_ambiguous_or_foreign_certificates_have_no_identity(
    sans: tuple[tuple[str, str], ...],
) -> None:
    assert identity_from_peercert({"subjectAltName": sans}) is None


def test_require_identity() -> None:
    assert require_identity(scope("admin"), {"admin"}) == "admin"
    with pytest.raises(IdentityNotAllowed):
        require_identity(scope("shop"), {"admin"})
    with pytest.raises(ClientCertificateRequired):
        require_identity({}, {"admin"})
