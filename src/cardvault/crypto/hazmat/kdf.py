"""HKDF-SHA256 and HMAC-SHA256, straight from ``cryptography``. Hazardous: see the package.

Neither function adds a label or a length prefix: domain separation is the caller's job,
and the safe layer does it (see ``docs/crypto-formats.md``).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
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
    mac = _hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()
