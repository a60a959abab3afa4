"""Public-key pins: the one pin format and the one pin check, for every client.

A pin is the SHA-256 digest of a certificate's DER SubjectPublicKeyInfo, written base64
(standard alphabet, padded: 44 characters) — HPKP's ``pin-sha256`` value without its
quotes, and what ``openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl
dgst -sha256 -binary | base64`` prints. The SDK's ``pin_sha256`` (``docs/sdk.md``) and a
forwarding destination's ``pin_sha256`` (``docs/forwarding.md``) both take this form.
Pinning the key rather than the certificate survives a renewal that keeps the key.

:func:`check_peer_pins` runs right after the TLS handshake, before a byte of the request
is written, and raises :class:`PinMismatch` unless the peer's key is one of the pins.
It adds to certificate verification and never replaces it: the handshake has already
verified the chain and the host name by the time it runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Collection
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cardvault.transport.errors import TransportError

__all__ = ["PIN_DIGEST_SIZE", "PinMismatch", "TlsPeer", "check_peer_pins", "is_pin", "spki_sha256"]

PIN_DIGEST_SIZE = 32


class PinMismatch(TransportError):
    """The server's public key matches none of the pins. Nothing was sent."""


class TlsPeer(Protocol):
    """What a TLS connection offers for the check: ``ssl.SSLObject`` (asyncio, aiohttp),
    ``ssl.SSLSocket``, and httpcore's low-level ``_ssl._SSLSocket``."""

    def getpeercert(self, binary_form: Literal[True], /) -> bytes | None: ...


def spki_sha256(der_certificate: bytes) -> str:
    """The pin of a certificate (DER): base64 SHA-256 of its SubjectPublicKeyInfo."""
    cert = x509.load_der_x509_certificate(der_certificate)
    # cryptography has no door to a certificate's SPKI bytes outside hazmat; this is one
    # of the two places outside cardvault.crypto allowed to use it (X.509 only).
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def is_pin(value: object) -> bool:
    """True when ``value`` is a pin: the canonical base64 (standard alphabet, padded) of a
    32-byte digest. A non-canonical spelling of the same bytes is refused, since it could
    never equal the pin :func:`spki_sha256` computes."""
    if not isinstance(value, str):
        return False
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII str
        return False
    return len(digest) == PIN_DIGEST_SIZE and base64.b64encode(digest).decode() == value


def check_peer_pins(peer: TlsPeer | None, pins: Collection[str]) -> None:
    """Return if the certificate ``peer`` presented has one of ``pins``; raise
    :class:`PinMismatch` otherwise — also when there is no TLS connection, no peer
    certificate, or no pin at all (a caller that does not pin does not call this).

    ``peer`` is the connection's SSL object (``transport.get_extra_info("ssl_object")``
    for asyncio and aiohttp, ``stream.get_extra_info("ssl_object")`` for httpcore).
    Each pin is compared in constant time.
    """
    # Positional: httpcore hands out the low-level _ssl._SSLSocket, whose getpeercert
    # takes its argument by position only.
    der = peer.getpeercert(True) if peer is not None else None
    if der:
        try:
            actual = spki_sha256(der).encode("ascii")
        except ValueError:  # a certificate cryptography cannot read has no pin to match
            actual = b""
        if actual and any(hmac.compare_digest(actual, pin.encode()) for pin in pins):
            return
    raise PinMismatch("the server's public key does not match any pinned key")
