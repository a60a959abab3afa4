from __future__ import annotations

import ssl

import pytest

from cardvault.transport.tls import client_context, server_context
from helpers import Pki


def test_intermediate_offers_only_ecdhe_aead_suites_and_tls12_plus(pki: Pki) -> None:
    ctx = server_context(*pki.cert("vault"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in ctx.get_ciphers()}
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all(n.startswith("ECDHE-") for n in tls12)
    assert not any("CBC" in n or ("SHA384" in n and "GCM" not in n) for n in names)
    assert all(("GCM" in n) or ("CHACHA20" in n) for n in names)
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_NONE


def test_modern_is_tls13_only(pki: Pki) -> None:
    assert (
        server_context(*pki.cert("vault"), profile="modern").minimum_version
        == ssl.TLSVersion.TLSv1_3
    )


def test_mutual_tls_requires_a_client_certificate(pki: Pki) -> None:
    ctx = server_context(*pki.cert("vault"), client_ca_file=pki.ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_unknown_profile_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="profile"):
        server_context(*pki.cert("vault"), profile="old")  # type: ignore[arg-type]


def test_client_context_always_verifies(pki: Pki) -> None:
    for ctx in (
        client_context(),
        client_context(pki.ca_file),
        client_context(pki.ca_file, minimum="modern"),
    ):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is True
    assert client_context(pki.ca_file, minimum="modern").minimum_version == ssl.TLSVersion.TLSv1_3
