"""HKDF-SHA256 and HMAC-SHA256. Hazardous: see the package.

HKDF comes from ``cryptography``. HMAC is the standard library's one-shot
:func:`hmac.digest`, which CPython computes in OpenSSL (the same library ``cryptography``
uses) in a single call: a card's fingerprint is computed on every tokenization, and
``cryptography``'s HMAC object (made, updated, finalized) cost about four times as much.

Neither function adds a label or a length prefix: domain separation is the caller's job,
and the safe layer does it (see ``docs/crypto-formats.md``).
"""

from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["hkdf_sha256_into", "hmac_sha256"]


def hkdf_sha256_into(
    ikm: bytes | bytearray,
    *,
    salt: bytes | None,
    info: bytes,
    length: int,
) -> bytearray:
    """RFC 5869 HKDF-SHA256 (extract then expand); the output lands in a fresh bytearray."""
    out = bytearray(length)
    HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive_into(ikm, out)
    return out


def hmac_sha256(key: bytes | bytearray, data: bytes | bytearray | memoryview) -> bytes:
    """RFC 2104 HMAC-SHA256 of ``data`` under ``key``: 32 bytes."""
    return _hmac.digest(key, data, "sha256")
