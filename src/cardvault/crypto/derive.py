"""Per-account derived keys and card fingerprints.

A fingerprint is an HMAC of the card number under a key derived for one account, so
the same card has the same fingerprint within an account and unrelated fingerprints in
two accounts (as Stripe's ``card.fingerprint``), and nobody without the KEK can test a
guessed card number against a fingerprint.
"""

from __future__ import annotations

import base64

from cardvault.crypto._encoding import check_key_name, lp
from cardvault.crypto.hazmat import hkdf_sha256_into, hmac_sha256
from cardvault.crypto.keys import KEY_SIZE, Key

__all__ = ["FINGERPRINT_BYTES", "derive_account_key", "fingerprint"]

# HKDF "info" starts with this label so that no other derivation from the same KEK,
# present or future, can produce the same bytes.
_ACCOUNT_KEY_LABEL = b"cardvault account key v1"

# 12 bytes of HMAC encode to exactly 16 base64url characters, with no padding, the
# length of Stripe's card.fingerprint. 96 bits keep accidental collisions out of reach:
# an account would need about 2**48 distinct cards before one became likely.
FINGERPRINT_BYTES = 12


def derive_account_key(kek: Key, account_id: str, purpose: str = "fingerprint") -> Key:
    """The key for ``purpose`` within ``account_id``, derived from ``kek``.

    HKDF-SHA256 with the KEK material as input keying material, no salt (the KEK is
    already uniformly random, which is when RFC 5869 allows omitting it), 32 bytes of
    output, and ``info = lp(label) || lp(purpose) || lp(account_id)`` (UTF-8, u32
    big-endian length prefixes). The derived key is named ``"<purpose>:<account_id>"``
    and carries the KEK's version, so a caller can tell which KEK version made it.
    """
    for value, what in ((account_id, "account id"), (purpose, "purpose")):
        if not isinstance(value, str):
            raise TypeError(f"the {what} must be a str")
        if not value:
            raise ValueError(f"the {what} must not be empty")
    name = f"{purpose}:{account_id}"
    check_key_name(name)
    info = lp(_ACCOUNT_KEY_LABEL) + lp(purpose.encode("utf-8")) + lp(account_id.encode("utf-8"))
    material = hkdf_sha256_into(kek._secret_buffer(), salt=None, info=info, length=KEY_SIZE)
    return Key(name, kek.version, material)


def fingerprint(account_key: Key, data: bytes | bytearray | memoryview) -> str:
    """A 16-character URL-safe fingerprint of ``data`` under ``account_key``.

    ``base64url(HMAC-SHA256(account_key, data)[:12])`` without padding (RFC 4648 §5,
    alphabet ``A-Z a-z 0-9 - _``). Give ``data`` in one canonical form (for a card, its
    digits only, as ASCII) or the same card gets two fingerprints.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("data must be bytes")
    mac = hmac_sha256(account_key._secret_buffer(), data)[:FINGERPRINT_BYTES]
    return base64.urlsafe_b64encode(mac).decode("ascii")
