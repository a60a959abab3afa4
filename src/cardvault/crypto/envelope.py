"""The envelope: AES-256-GCM ciphertext that names its key and is bound to its record.

Layout (format 0x01; ``docs/crypto-formats.md`` is the reference)::

    0x01 | u8 len(key name) | key name | u32 key version | nonce (12) | ciphertext | tag (16)

Associated data is the header (everything before the nonce) followed by the canonical
encoding of the caller's context. Changing any header byte, or opening under another
context, fails authentication. The nonce is 96 random bits drawn here; callers never
choose one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cardvault.crypto._encoding import (
    Context,
    NonceSource,
    Reader,
    as_bytes,
    check_key_name,
    check_key_version,
    draw_nonce,
    encode_context,
    u8,
    u32,
)
from cardvault.crypto.exceptions import InvalidCiphertext
from cardvault.crypto.hazmat import (
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
    InvalidTag,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
)
from cardvault.crypto.keys import Key

__all__ = [
    "ENVELOPE_FORMAT_V1",
    "EnvelopeHeader",
    "open_",
    "read_envelope_header",
    "seal",
]

# Format bytes are one registry across every cardvault format (see the docs), so that
# the first byte of associated data also separates formats from each other.
ENVELOPE_FORMAT_V1 = 0x01


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The public part of an envelope. Unauthenticated until the envelope is opened."""

    format_version: int
    key_name: str
    key_version: int


@functools.lru_cache(maxsize=256, typed=True)
def _header(key_name: str, key_version: int) -> bytes:
    # Cached: a process seals under a handful of keys. Invalid names and versions raise,
    # and raising is never cached.
    name = check_key_name(key_name)
    return u8(ENVELOPE_FORMAT_V1) + u8(len(name)) + name + u32(check_key_version(key_version))


def _parse(ciphertext: bytes) -> tuple[EnvelopeHeader, bytes, bytes, bytes]:
    """Split an envelope into (header, header bytes, nonce, ciphertext+tag)."""
    reader = Reader(ciphertext)
    if reader.u8() != ENVELOPE_FORMAT_V1:
        raise InvalidCiphertext from None
    key_name = reader.name()
    key_version = reader.version()
    header_bytes = ciphertext[: reader.position]
    nonce = reader.take(GCM_NONCE_SIZE)
    body = reader.rest()
    if len(body) < GCM_TAG_SIZE:
        raise InvalidCiphertext from None
    return EnvelopeHeader(ENVELOPE_FORMAT_V1, key_name, key_version), header_bytes, nonce, body


def read_envelope_header(ciphertext: bytes | bytearray) -> EnvelopeHeader:
    """Which key and version an envelope names, without opening it.

    For finding the data key to fetch. The answer is unauthenticated: it only says
    which key to try. Raises :class:`InvalidCiphertext` if the envelope is malformed.
    """
    header, _, _, _ = _parse(as_bytes(ciphertext, "ciphertext"))
    return header


def seal(
    key: Key,
    plaintext: bytes | bytearray | memoryview,
    context: Context,
    *,
    nonce_source_for_tests: NonceSource | None = None,
) -> bytes:
    """Encrypt ``plaintext`` under ``key``, bound to ``context``. Returns an envelope.

    ``context`` names the record the ciphertext belongs to, e.g.
    ``{"account": "acct_1", "mode": "live", "object": "pm_123", "field": "number"}``;
    the same context must be given to :func:`open_`. It must not be empty.

    ``nonce_source_for_tests`` exists only for known-answer tests. Production code never
    passes it: a repeated nonce under one key breaks GCM completely.
    """
    # Type-checked but not copied: a bytearray plaintext stays the caller's only copy.
    # A memoryview is accepted so that a card number's wipeable buffer can be sealed
    # without an intermediate bytes copy.
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError("plaintext must be bytes")
    header = _header(key.name, key.version)
    aad = header + encode_context(context)
    nonce = draw_nonce(nonce_source_for_tests)
    return header + nonce + aes_gcm_encrypt(key._aes_gcm(), nonce, plaintext, aad)


def open_(key: Key, ciphertext: bytes | bytearray, context: Context) -> bytes:
    """Decrypt an envelope made by :func:`seal` with this key and this context.

    Raises :class:`InvalidCiphertext`, and only that, whenever the envelope does not
    open: malformed, truncated, altered, another key or key version, another context.
    """
    blob = as_bytes(ciphertext, "ciphertext")
    context_bytes = encode_context(context)
    cipher = key._aes_gcm()
    header, header_bytes, nonce, body = _parse(blob)
    if header.key_name != key.name or header.key_version != key.version:
        raise InvalidCiphertext from None
    try:
        return aes_gcm_decrypt(cipher, nonce, body, header_bytes + context_bytes)
    except InvalidTag:
        raise InvalidCiphertext from None
