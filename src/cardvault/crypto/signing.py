"""Ed25519 signatures (RFC 8032): signing keys that never print, one opaque error.

::

    key = SigningKey.generate()
    signature = sign(key, message)                  # 64 bytes, deterministic
    verify(key.public_key, message, signature)      # or raise InvalidSignature

- :class:`SigningKey` — a private key. ``repr``/``str`` show only a digest of its public
  key; it cannot be pickled or copied. It leaves its object in one way only,
  :meth:`SigningKey.expose_private_pem` (PKCS#8 PEM, unencrypted), for the file that
  keeps it.
- :class:`VerifyKey` — a public key: 32 raw bytes (RFC 8032 encoding), read from and
  written as SubjectPublicKeyInfo PEM. Compares by value.
- :func:`verify` raises :class:`InvalidSignature` for every signature that does not
  verify, whatever the reason; it never returns a flag to forget.

Signatures are what RFC 8032 defines (pure Ed25519, no context, no pre-hash): a
signature made here verifies with any Ed25519 implementation and the other way round.
What is signed, and how it is written down, is the caller's format (for the audit log:
``docs/audit.md`` and :mod:`cardvault.audit.signing`). The primitive underneath is
``cryptography``'s, through :mod:`cardvault.crypto.hazmat.ed25519`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NoReturn, final

from cardvault.crypto.exceptions import InvalidSignature
from cardvault.crypto.hazmat import ed25519 as _ed25519

__all__ = ["SIGNATURE_SIZE", "SigningKey", "VerifyKey", "sign", "verify"]

SIGNATURE_SIZE = _ed25519.ED25519_SIGNATURE_SIZE


@final
class VerifyKey:
    """An Ed25519 public key. Public: ``repr`` shows it."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: _ed25519.Ed25519PublicKey) -> None:
        # For this module; others build one with from_raw or from_pem.
        self._key = key
        self._raw = _ed25519.ed25519_public_raw(key)

    @classmethod
    def from_raw(cls, raw: bytes | bytearray) -> VerifyKey:
        """The key whose RFC 8032 encoding is ``raw`` (32 bytes); ``ValueError`` else."""
        return cls(_ed25519.ed25519_public_from_raw(raw))

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        """Read SubjectPublicKeyInfo PEM. ``ValueError`` ("not a readable PEM public key",
        "not an Ed25519 public key") for anything else."""
        return cls(_ed25519.ed25519_public_from_pem(pem))

    @property
    def raw(self) -> bytes:
        """The RFC 8032 encoding: 32 bytes."""
        return self._raw

    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``)."""
        return _ed25519.ed25519_public_to_pem(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifyKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self._raw.hex()})"


@final
class SigningKey:
    """An Ed25519 private key. ``repr`` and ``str`` never show it.

    ``cryptography`` keeps the key in OpenSSL's memory, which it frees but does not
    promise to zero; there is no ``wipe`` because there is no buffer here to zero.
    """

    __slots__ = ("_key", "_public")

    def __init__(self, key: _ed25519.Ed25519PrivateKey) -> None:
        # For this module; others build one with generate, from_pem or from_seed.
        self._key = key
        self._public = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(_ed25519.ed25519_generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Read an unencrypted PEM private key (PKCS#8, as :meth:`expose_private_pem`
        writes). ``ValueError`` ("not a readable, unencrypted PEM private key", "not an
        Ed25519 private key") for anything else; the message never quotes the file."""
        return cls(_ed25519.ed25519_private_from_pem(pem))

    @classmethod
    def from_seed(cls, seed: bytes | bytearray) -> SigningKey:
        """The key whose RFC 8032 private key is ``seed`` (32 bytes). For known-answer
        tests and fixed test fixtures; a real key comes from :meth:`generate`."""
        return cls(_ed25519.ed25519_private_from_seed(seed))

    @property
    def public_key(self) -> VerifyKey:
        return self._public

    def expose_private_pem(self) -> bytes:
        """The private key as PKCS#8 PEM, unencrypted, for the one place it must go: the
        key file (mode 0600). Grep for this name to find every place a key leaves its
        object."""
        return _ed25519.ed25519_private_to_pem(self._key)

    def __repr__(self) -> str:
        # Names the public half only: "ed25519:" and 16 hex digits of its SHA-256 (what
        # the audit log calls the key id).
        return f"SigningKey(ed25519:{hashlib.sha256(self._public.raw).hexdigest()[:16]})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the key to wherever the pickle goes (a cache, a queue).
        raise TypeError("SigningKey objects cannot be pickled or copied")


def sign(key: SigningKey, message: bytes) -> bytes:
    """The Ed25519 signature of ``message``: 64 bytes. The same key and message always
    give the same signature (RFC 8032 signing is deterministic)."""
    if not isinstance(key, SigningKey):
        raise TypeError("key must be a SigningKey")
    return _ed25519.ed25519_sign(key._key, bytes(message))


def verify(public_key: VerifyKey, message: bytes, signature: bytes) -> None:
    """Return if ``signature`` is ``public_key``'s signature of ``message``; raise
    :class:`InvalidSignature` otherwise, whatever the reason."""
    if not isinstance(public_key, VerifyKey):
        raise TypeError("public_key must be a VerifyKey")
    if (
        not isinstance(signature, bytes | bytearray)
        or len(signature) != SIGNATURE_SIZE
        or not _ed25519.ed25519_verify(public_key._key, bytes(signature), bytes(message))
    ):
        raise InvalidSignature from None
