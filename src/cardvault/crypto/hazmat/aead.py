"""Raw AES-256-GCM with a caller-chosen nonce. Hazardous: see the package docstring.

Only 256-bit keys, 96-bit nonces and 128-bit tags are accepted. Other sizes are legal
GCM, but each one we allow is one more way to get it wrong: a short tag weakens forgery
resistance, and a non-96-bit nonce goes through GHASH, which changes the collision bound
that random nonces rely on.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "AES_256_KEY_SIZE",
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "InvalidTag",
    "aes_gcm_decrypt",
    "aes_gcm_decrypt_into",
    "aes_gcm_encrypt",
]

AES_256_KEY_SIZE = 32
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16


def _check_sizes(key: bytes | bytearray, nonce: bytes | bytearray) -> None:
    if len(key) != AES_256_KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    if len(nonce) != GCM_NONCE_SIZE:
        raise ValueError("AES-256-GCM here needs a 12-byte nonce")


def aes_gcm_encrypt(
    key: bytes | bytearray,
    nonce: bytes | bytearray,
    plaintext: bytes | bytearray | memoryview,
    associated_data: bytes | bytearray,
) -> bytes:
    """Return ``ciphertext || tag`` (tag: 16 bytes). The nonce must never repeat per key."""
    _check_sizes(key, nonce)
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aes_gcm_decrypt(
    key: bytes | bytearray,
    nonce: bytes | bytearray,
    ciphertext_and_tag: bytes | bytearray,
    associated_data: bytes | bytearray,
) -> bytes:
    """Return the plaintext, or raise :class:`InvalidTag` if anything does not verify."""
    _check_sizes(key, nonce)
    if len(ciphertext_and_tag) < GCM_TAG_SIZE:
        raise InvalidTag
    return AESGCM(key).decrypt(nonce, ciphertext_and_tag, associated_data)


def aes_gcm_decrypt_into(
    key: bytes | bytearray,
    nonce: bytes | bytearray,
    ciphertext_and_tag: bytes | bytearray,
    associated_data: bytes | bytearray,
) -> bytearray:
    """Like :func:`aes_gcm_decrypt`, but the plaintext lands in a fresh ``bytearray``.

    Used for key material, so that the caller holds the only copy and can zero it.
    """
    _check_sizes(key, nonce)
    if len(ciphertext_and_tag) < GCM_TAG_SIZE:
        raise InvalidTag
    out = bytearray(len(ciphertext_and_tag) - GCM_TAG_SIZE)
    AESGCM(key).decrypt_into(nonce, ciphertext_and_tag, associated_data, out)
    return out
