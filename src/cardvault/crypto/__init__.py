"""The safe crypto layer: what every other part of cardvault calls.

Callers seal and open; they never pick a nonce, a cipher or an encoding::

    from cardvault import crypto

    ring = crypto.Keyring.generate("pan")
    context = {"account": "acct_1", "mode": "live", "object": "pm_123", "field": "number"}
    blob = ring.seal(b"4242424242424242", context)
    assert ring.open_(blob, context) == b"4242424242424242"

- :func:`seal` / :func:`open_` — AES-256-GCM envelopes that name their key and key
  version and are bound to a context (the record they belong to).
- :class:`Keyring` — versions of one key; ``rotate``, ``rewrap``,
  ``min_decryption_version``, ``destroy_retired``.
- :func:`wrap_key` / :func:`unwrap_key` — data keys under a KEK, bound to a purpose.
- :func:`derive_account_key` / :func:`fingerprint` — Stripe-style card fingerprints.
- :func:`shamir_split` / :func:`shamir_combine` / :func:`key_check_value` — the root key
  as custodian shares.
- :class:`SigningKey` / :class:`VerifyKey` / :func:`sign` / :func:`verify` — Ed25519
  signatures (the audit log's checkpoints).
- :mod:`cardvault.crypto.webhook` — Stripe's webhook signature (``Stripe-Signature``,
  HMAC-SHA256) and ``whsec_`` secrets, for the vault's deliveries and ``cardvault listen``.

Every value that does not open raises :class:`InvalidCiphertext`, and every signature
that does not verify :class:`InvalidSignature`, whatever the reason.
Byte layouts are specified in ``docs/crypto-formats.md``. The primitives underneath are
in :mod:`cardvault.crypto.hazmat`, which nothing outside this package may import.
"""

from __future__ import annotations

from cardvault.crypto._encoding import MAX_KEY_VERSION, Context, encode_context
from cardvault.crypto.derive import FINGERPRINT_BYTES, derive_account_key, fingerprint
from cardvault.crypto.envelope import (
    ENVELOPE_FORMAT_V1,
    EnvelopeHeader,
    open_,
    read_envelope_header,
    seal,
)
from cardvault.crypto.exceptions import (
    CryptoError,
    InvalidCiphertext,
    InvalidShare,
    InvalidSignature,
    KeyCheckMismatch,
)
from cardvault.crypto.keyring import Keyring
from cardvault.crypto.keys import (
    KEY_SIZE,
    Key,
    generate_key,
    key_check_value,
    verify_key_check_value,
)
from cardvault.crypto.shamir import SHARE_PREFIX, Share, shamir_combine, shamir_split
from cardvault.crypto.signing import SIGNATURE_SIZE, SigningKey, VerifyKey, sign, verify
from cardvault.crypto.wrap import (
    WRAPPED_KEY_FORMAT_V1,
    WrappedKeyHeader,
    read_wrapped_key_header,
    unwrap_key,
    wrap_key,
)

__all__ = [
    "ENVELOPE_FORMAT_V1",
    "FINGERPRINT_BYTES",
    "KEY_SIZE",
    "MAX_KEY_VERSION",
    "SHARE_PREFIX",
    "SIGNATURE_SIZE",
    "WRAPPED_KEY_FORMAT_V1",
    "Context",
    "CryptoError",
    "EnvelopeHeader",
    "InvalidCiphertext",
    "InvalidShare",
    "InvalidSignature",
    "Key",
    "KeyCheckMismatch",
    "Keyring",
    "Share",
    "SigningKey",
    "VerifyKey",
    "WrappedKeyHeader",
    "derive_account_key",
    "encode_context",
    "fingerprint",
    "generate_key",
    "key_check_value",
    "open_",
    "read_envelope_header",
    "read_wrapped_key_header",
    "seal",
    "shamir_combine",
    "shamir_split",
    "sign",
    "unwrap_key",
    "verify",
    "verify_key_check_value",
    "wrap_key",
]
