"""The exceptions of the crypto layer.

::

    CryptoError
    ├── InvalidCiphertext    any sealed value or wrapped key that does not open
    ├── InvalidShare         a Shamir share that is malformed, mistyped or mismatched
    ├── InvalidSignature     a signature that does not verify, whatever the reason
    └── KeyCheckMismatch     a key whose check value is not the one expected

These are lower-layer exceptions. A service boundary translates them into a leaf of
:mod:`cardvault.errors` with ``raise Leaf(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "CryptoError",
    "InvalidCiphertext",
    "InvalidShare",
    "InvalidSignature",
    "KeyCheckMismatch",
]


class CryptoError(Exception):
    """Base of the crypto layer's exceptions."""


class InvalidCiphertext(CryptoError):
    """A ciphertext or wrapped key did not open. Deliberately says nothing about why.

    Truncation, a flipped bit, an unknown format, the wrong key, an unknown or retired
    key version, and the wrong context all raise this one exception with this one
    message. Telling them apart would help an attacker probe (which header fields are
    accepted, which versions exist) and would help no legitimate caller, who can only
    treat the value as unreadable either way. It is raised ``from None`` so that no
    chained exception carries the reason either.
    """

    def __init__(self) -> None:
        super().__init__("The ciphertext could not be opened.")


class InvalidShare(CryptoError):
    """A Shamir share is malformed, fails its checksum, or does not fit the others.

    The message says which check failed and may name a share's index, which is not
    secret; it never contains share bytes.
    """


class InvalidSignature(CryptoError):
    """A signature did not verify. Like :class:`InvalidCiphertext`, says nothing about why.

    A signature of the wrong length, one made by another key, one over another message
    and one that is not an Ed25519 signature at all raise this one exception with this
    one message, ``from None``: a verifier can only refuse the value either way.
    """

    def __init__(self) -> None:
        super().__init__("The signature does not verify.")


class KeyCheckMismatch(CryptoError):
    """A key's check value differs from the expected one: it is not the right key."""

    def __init__(self) -> None:
        super().__init__("The key does not match the expected key check value.")
