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


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A whole TLS handshake in memory, then one byte of application data from the server
    (TLS 1.3 sends its session tickets after the handshake). Returns the client's side;
    a failed handshake raises ``ssl.SSLError`` from whichever side gave up."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)

    def pump() -> None:
        s_in.write(c_out.read())
        c_in.write(s_out.read())

    done: set[str] = set()
    for _ in range(10):
        for name, side in (("client", cli), ("server", srv)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        pump()
        if done == {"client", "server"}:
            break
    assert done == {"client", "server"}
    srv.write(b"x")
    pump()
    assert cli.read(1) == b"x"
    return cli


def offering(
    pki: Pki, group: str, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> ssl.SSLContext:
    ctx = client_context(pki.ca_file)
    ctx.set_ecdh_curve(group)  # the client offers this key-exchange group only
    ctx.maximum_version = maximum
    return ctx


@pytest.mark.parametrize("group", ["X448", "secp521r1"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_groups_outside_the_profile_are_refused(
    pki: Pki, group: str, version: ssl.TLSVersion
) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(server_context(*pki.cert("vault")), offering(pki, group, version))


@pytest.mark.parametrize("group", ["X448", "secp521r1"])
def test_the_group_check_can_fail(pki: Pki, group: str) -> None:
    # Python's own server context (what the example shop used to build) accepts both.
    # (In TLS 1.2 a client that offers only these groups cannot use the P-256
    # certificate at all, so the comparison is made in TLS 1.3.)
    python_default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    python_default.load_cert_chain(*pki.cert("vault"))
    assert handshake(python_default, offering(pki, group)).version() == "TLSv1.3"


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
def test_the_profiles_groups_are_accepted(pki: Pki, group: str) -> None:
    assert handshake(server_context(*pki.cert("vault")), offering(pki, group)).version()


@pytest.mark.parametrize(
    "version",
    [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
)
def test_no_session_ticket_is_issued(pki: Pki, version: ssl.TLSVersion) -> None:
    client = client_context(pki.ca_file)
    client.maximum_version = version
    session = handshake(server_context(*pki.cert("vault")), client).session
    assert session is not None
    assert not session.has_ticket
    # The check can fail: Python's own server context issues tickets.
    python_default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    python_default.load_cert_chain(*pki.cert("vault"))
    ticketed = handshake(python_default, client).session
    assert ticketed is not None and ticketed.has_ticket
