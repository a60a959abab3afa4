"""Raw Ed25519 (RFC 8032) from ``cryptography``. Hazardous: see the package docstring.

The private key here is ``cryptography``'s object, which nothing stops from being
logged, pickled into a cache or written out unencrypted; verification answers with a
``bool`` that a caller can forget to look at; PEM loading trusts the caller to check
what the file held. :mod:`cardvault.crypto.signing` is the safe layer over this.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ED25519_PUBLIC_KEY_SIZE",
    "ED25519_SEED_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "ed25519_generate",
    "ed25519_private_from_pem",
    "ed25519_private_from_seed",
    "ed25519_private_to_pem",
    "ed25519_public_from_pem",
    "ed25519_public_from_raw",
    "ed25519_public_raw",
    "ed25519_public_to_pem",
    "ed25519_sign",
    "ed25519_verify",
]

ED25519_SEED_SIZE = 32
ED25519_PUBLIC_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64


def ed25519_generate() -> Ed25519PrivateKey:
    """A fresh key from the operating system's CSPRNG (inside OpenSSL)."""
    return Ed25519PrivateKey.generate()


def ed25519_private_from_seed(seed: bytes | bytearray) -> Ed25519PrivateKey:
    """The key whose RFC 8032 private key (the 32-byte seed) is ``seed``."""
    if len(seed) != ED25519_SEED_SIZE:
        raise ValueError("an Ed25519 private key is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(bytes(seed))


def ed25519_private_from_pem(pem: bytes) -> Ed25519PrivateKey:
    """An unencrypted PEM private key that must be Ed25519.

    Raises ``ValueError`` saying "not a readable, unencrypted PEM private key" or "not an
    Ed25519 private key" (the message never holds any of the file's bytes).
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a readable, unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def ed25519_private_to_pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as PKCS#8 PEM, unencrypted: the private key in the clear."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ed25519_public_from_raw(raw: bytes | bytearray) -> Ed25519PublicKey:
    """The public key whose RFC 8032 encoding (32 bytes) is ``raw``."""
    if len(raw) != ED25519_PUBLIC_KEY_SIZE:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(raw))


def ed25519_public_from_pem(pem: bytes) -> Ed25519PublicKey:
    """A SubjectPublicKeyInfo PEM public key that must be Ed25519; ``ValueError`` else."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a readable PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def ed25519_public_raw(key: Ed25519PublicKey) -> bytes:
    """The RFC 8032 encoding of ``key``: 32 bytes."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_public_to_pem(key: Ed25519PublicKey) -> bytes:
    """``key`` as SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ed25519_sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte RFC 8032 signature of ``message`` (deterministic: same key and
    message, same signature)."""
    return key.sign(message)


def ed25519_verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature of ``message``. A ``False`` that
    nobody looks at accepts a forgery: the safe layer raises instead."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
