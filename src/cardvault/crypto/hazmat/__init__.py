"""Hazardous materials: raw primitives that are easy to misuse.

WARNING: this package is hazardous. Its functions do exactly what they are told and
nothing more. AES-GCM here takes the nonce from the caller, and a nonce used twice
under one key reveals the XOR of the two plaintexts and lets an attacker forge tags for
that key. Nothing here names a key version, binds a ciphertext to its record, wipes a
key, or turns a failure into one opaque error. Shamir here trusts every share it is
given. Those guarantees live one level up, in :mod:`cardvault.crypto`.

Only :mod:`cardvault.crypto` may import this package. Everything else calls the safe
layer (``seal``/``open_``, ``Keyring``, ``wrap_key``, ``fingerprint``,
``shamir_split``, ``sign``/``verify``). A unit test parses every import under
``src/cardvault`` and fails on any other importer.

AES, GCM, HMAC, HKDF and Ed25519 come from the ``cryptography`` package; none of them is
written here. The one primitive written here is Shamir's secret sharing over GF(2^8)
(:mod:`.shamir`), because it is a few dozen lines of field arithmetic and no pinned
dependency provides it for 32-byte secrets.
"""

from __future__ import annotations

from cardvault.crypto.hazmat.aead import (
    AES_256_KEY_SIZE,
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
    AesGcmContext,
    InvalidTag,
    aes_gcm_context,
    aes_gcm_decrypt,
    aes_gcm_decrypt_into,
    aes_gcm_encrypt,
)
from cardvault.crypto.hazmat.ed25519 import (
    ED25519_PUBLIC_KEY_SIZE,
    ED25519_SEED_SIZE,
    ED25519_SIGNATURE_SIZE,
    Ed25519PrivateKey,
    Ed25519PublicKey,
    ed25519_generate,
    ed25519_private_from_pem,
    ed25519_private_from_seed,
    ed25519_private_to_pem,
    ed25519_public_from_pem,
    ed25519_public_from_raw,
    ed25519_public_raw,
    ed25519_public_to_pem,
    ed25519_sign,
    ed25519_verify,
)
from cardvault.crypto.hazmat.kdf import hkdf_sha256_into, hmac_sha256
from cardvault.crypto.hazmat.shamir import (
    gf256_div,
    gf256_inv,
    gf256_mul,
    shamir_combine,
    shamir_split,
)

__all__ = [
    "AES_256_KEY_SIZE",
    "ED25519_PUBLIC_KEY_SIZE",
    "ED25519_SEED_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "AesGcmContext",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "InvalidTag",
    "aes_gcm_context",
    "aes_gcm_decrypt",
    "aes_gcm_decrypt_into",
    "aes_gcm_encrypt",
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
    "gf256_div",
    "gf256_inv",
    "gf256_mul",
    "hkdf_sha256_into",
    "hmac_sha256",
    "shamir_combine",
    "shamir_split",
]
