"""transport.pins: the pin of a certificate, and the one check every client makes.

The check against a live TLS handshake is tested through the SDK
(``tests/unit/client/test_client.py``, pins that match and pins that do not, against
real listeners) and through forwarding (``tests/e2e``); here the function itself, with
a stand-in for the SSL object.
"""

from __future__ import annotations

import base64
import hashlib

import cryptography_vectors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cardvault.transport.errors import TransportError
from cardvault.transport.pins import PinMismatch, check_peer_pins, is_pin, spki_sha256

# Known answers, computed with OpenSSL rather than with the code under test:
#   openssl x509 -in FILE -pubkey -noout | openssl pkey -pubin -outform der \
#     | openssl dgst -sha256 -binary | base64
# over certificates that ship in cryptography_vectors/x509/. The Let's Encrypt X3 pin
# is also the one Let's Encrypt published for HPKP.
KNOWN_PINS = {
    "cryptography.io.pem": "jeHmKR1BO+YKvR3Re25kVbbBci7g3TE513U0i1o2l8I=",  # RSA
    "letsencryptx3.pem": "YLh1dUR9y6Kja30RrAn7JKnbQG/uEtLMkBgFF2Fuihg=",  # RSA
    "ecdsa_root.pem": "uUwZgwDOxcBXrQcntwu+kYFpkiVkOaezL0WYEZ3anJc=",  # EC
}


def der_of(name: str) -> bytes:
    with cryptography_vectors.open_vector_file(f"x509/{name}", "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    return cert.public_bytes(serialization.Encoding.DER)


class Peer:
    """A stand-in for ssl.SSLObject: the peer certificate, asked for by position."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool, /) -> bytes | None:
        assert binary_form is True
        return self.der


@pytest.mark.parametrize(("name", "pin"), sorted(KNOWN_PINS.items()))
def test_the_pin_of_a_certificate_is_what_openssl_computes(name: str, pin: str) -> None:
    assert spki_sha256(der_of(name)) == pin
    assert is_pin(pin)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not base64!",
        base64.b64encode(b"short").decode(),
        base64.b64encode(bytes(33)).decode(),
        hashlib.sha256(b"spki").hexdigest(),  # hex, not base64
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # the URL-safe alphabet
        base64.b64encode(bytes(32)).decode().rstrip("="),  # unpadded
        "sha256/" + KNOWN_PINS["ecdsa_root.pem"],  # HPKP's header syntax: not this format
        KNOWN_PINS["ecdsa_root.pem"][:42] + "d=",  # the same bytes, not canonically written
        "é" * 44,
        None,
        b"jeHmKR1BO+YKvR3Re25kVbbBci7g3TE513U0i1o2l8I=",
    ],
)
def test_only_base64_of_a_32_byte_digest_is_a_pin(value: object) -> None:
    assert not is_pin(value)


def test_a_peer_with_a_pinned_key_passes() -> None:
    der = der_of("ecdsa_root.pem")
    check_peer_pins(Peer(der), [KNOWN_PINS["ecdsa_root.pem"]])
    check_peer_pins(Peer(der), [KNOWN_PINS["letsencryptx3.pem"], KNOWN_PINS["ecdsa_root.pem"]])
    check_peer_pins(Peer(der), frozenset(KNOWN_PINS.values()))


@pytest.mark.parametrize(
    ("peer", "pins"),
    [
        (Peer(der_of("ecdsa_root.pem")), [KNOWN_PINS["letsencryptx3.pem"]]),
        (Peer(der_of("ecdsa_root.pem")), []),  # no pin matches nothing
        (Peer(None), [KNOWN_PINS["ecdsa_root.pem"]]),  # no certificate
        (Peer(b""), [""]),  # no certificate and an empty "pin"
        (None, [KNOWN_PINS["ecdsa_root.pem"]]),  # not a TLS connection
        (Peer(b"not a certificate"), [KNOWN_PINS["ecdsa_root.pem"]]),
    ],
    ids=["other key", "no pins", "no certificate", "empty pin", "no TLS", "unreadable"],
)
def test_anything_else_raises_pin_mismatch(peer: Peer | None, pins: list[str]) -> None:
    with pytest.raises(PinMismatch) as info:
        check_peer_pins(peer, pins)
    assert str(info.value) == "the server's public key does not match any pinned key"


def test_pin_mismatch_is_a_transport_error() -> None:
    # The SDK documents every network and TLS failure as TransportError.
    assert issubclass(PinMismatch, TransportError)


def test_the_sdk_and_its_docs_use_this_pin_and_this_exception() -> None:
    from cardvault import client
    from cardvault.client import http

    assert client.PinMismatch is PinMismatch
    assert client.TransportError is TransportError
    assert http.spki_sha256 is spki_sha256  # named in docs/sdk.md
