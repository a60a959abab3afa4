"""Raw AES-256-GCM with a caller-chosen nonce. Hazardous: see the package docstring.

Only 256-bit keys, 96-bit nonces and 128-bit tags are accepted. Other sizes are legal
GCM, but each one we allow is one more way to get it wrong: a short tag weakens forgery
resistance, and a non-96-bit nonce goes through GHASH, which changes the collision bound
that random nonces rely on.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "AES_256_KEY_SIZE",
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "AesGcmContext",
    "InvalidTag",
    "aes_gcm_context",
    "aes_gcm_decrypt",
    "aes_gcm_decrypt_into",
    "aes_gcm_encrypt",
]

AES_256_KEY_SIZE = 32
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16


class AesGcmContext:
    """A 256-bit key made ready for AES-256-GCM, by :func:`aes_gcm_context` only.

    It holds ``cryptography``'s ``AESGCM`` for the key: building that (OpenSSL's cipher
    context, the expanded key) was most of the cost of sealing one card number, so a
    ``Key`` keeps one. The context holds its own copy of the key material in OpenSSL's
    memory for as long as it lives: drop it with the key (see ``Key.wipe``).
    """

    __slots__ = ("_aead",)

    def __init__(self, aead: AESGCM) -> None:
        self._aead = aead

    def __repr__(self) -> str:
        return "AesGcmContext(...)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("AesGcmContext objects cannot be pickled or copied")


def _check_key(key: bytes | bytearray) -> None:
    if len(key) != AES_256_KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")


def _check_nonce(nonce: bytes | bytearray) -> None:
    if len(nonce) != GCM_NONCE_SIZE:
        raise ValueError("AES-256-GCM here needs a 12-byte nonce")


def aes_gcm_context(key: bytes | bytearray) -> AesGcmContext:
    """``key`` (32 bytes) made ready for :func:`aes_gcm_encrypt` and
    :func:`aes_gcm_decrypt`."""
    _check_key(key)
    return AesGcmContext(AESGCM(key))


def _context(key: bytes | bytearray | AesGcmContext) -> AESGCM:
    if type(key) is AesGcmContext:
        return key._aead
    if not isinstance(key, bytes | bytearray):
        raise TypeError("key must be 32 bytes or an AesGcmContext")
    _check_key(key)
    return AESGCM(key)


def aes_gcm_encrypt(
    key: bytes | bytearray | AesGcmContext,
    nonce: bytes | bytearray,
    plaintext: bytes | bytearray | memoryview,
    associated_data: bytes | bytearray,
) -> bytes:
    """Return ``ciphertext || tag`` (tag: 16 bytes). The nonce must never repeat per key.
    ``key``: 32 bytes, or a context from :func:`aes_gcm_context`."""
    _check_nonce(nonce)
    return _context(key).encrypt(nonce, plaintext, associated_data)


def aes_gcm_decrypt(
    key: bytes | bytearray | AesGcmContext,
    nonce: bytes | bytearray,
    ciphertext_and_tag: bytes | bytearray,
    associated_data: bytes | bytearray,
) -> bytes:
    """Return the plaintext, or raise :class:`InvalidTag` if anything does not verify.
    ``key``: 32 bytes, or a context from :func:`aes_gcm_context`."""
    _check_nonce(nonce)
    context = _context(key)
    if len(ciphertext_and_tag) < GCM_TAG_SIZE:
        raise InvalidTag
    return context.decrypt(nonce, ciphertext_and_tag, associated_data)


def aes_gcm_decrypt_into(
    key: bytes | bytearray,
    nonce: bytes | bytearray,
    ciphertext_and_tag: bytes | bytearray,
    associated_data: bytes | bytearray,
) -> bytearray:
    """Like :func:`aes_gcm_decrypt`, but the plaintext lands in a fresh ``bytearray``.

    Used for key material, so that the caller holds the only copy and can zero it.
    """
    _check_key(key)
    _check_nonce(nonce)
    if len(ciphertext_and_tag) < GCM_TAG_SIZE:
        raise InvalidTag
    out = bytearray(len(ciphertext_and_tag) - GCM_TAG_SIZE)
    AESGCM(key).decrypt_into(nonce, ciphertext_and_tag, associated_data, out)
    return out
