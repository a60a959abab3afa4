"""The service's audit signing key (Ed25519) and the checkpoint signature.

The key is ``audit.key`` (PKCS#8 PEM, mode 0600) in the service's state directory,
created on first use; its public half is ``audit.pub`` (SubjectPublicKeyInfo PEM) beside
the log, to be published. Signing and verifying are :mod:`cardvault.crypto`'s
(:func:`cardvault.crypto.sign`, :func:`cardvault.crypto.verify`); the key files are
written by :mod:`cardvault.files`.

A checkpoint signs, for the record numbered ``seq`` whose hash is ``head``::

    message = b"cardvault audit checkpoint v1\\x00" || bytes.fromhex(head) || seq as 8 bytes, big-endian
    signature = Ed25519(audit.key, message), written base64 (standard alphabet, padded)

The constant prefix keeps a checkpoint signature from meaning anything else this key
might one day sign. ``key_id`` is ``ed25519:`` and the first 16 hex digits of the
SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import Final

from cardvault.audit.errors import AuditCorrupt
from cardvault.crypto import InvalidSignature, SigningKey, VerifyKey, sign, verify
from cardvault.files import create_private

__all__ = [
    "CHECKPOINT_CONTEXT",
    "KEY_FILE",
    "PUBLIC_KEY_FILE",
    "checkpoint_message",
    "ensure_public_key",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "sign_checkpoint",
    "verify_checkpoint",
]

KEY_FILE: Final = "audit.key"
PUBLIC_KEY_FILE: Final = "audit.pub"
CHECKPOINT_CONTEXT: Final = b"cardvault audit checkpoint v1\x00"


def checkpoint_message(head: str, seq: int) -> bytes:
    """The bytes a checkpoint signs (module docstring)."""
    raw = bytes.fromhex(head)
    if len(raw) != 32 or seq < 0:
        raise ValueError("a checkpoint signs a 32-byte head and a non-negative seq")
    return CHECKPOINT_CONTEXT + raw + seq.to_bytes(8, "big")


def key_id(public_key: VerifyKey) -> str:
    return "ed25519:" + hashlib.sha256(public_key.raw).hexdigest()[:16]


def sign_checkpoint(key: SigningKey, head: str, seq: int) -> str:
    return base64.b64encode(sign(key, checkpoint_message(head, seq))).decode("ascii")


def verify_checkpoint(public_key: VerifyKey, head: str, seq: int, signature: str) -> bool:
    """True when ``signature`` is this key's signature of (``head``, ``seq``)."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        verify(public_key, checkpoint_message(head, seq), raw)
    except (InvalidSignature, ValueError, binascii.Error, UnicodeEncodeError):
        return False
    return True


def load_public_key(path: Path) -> VerifyKey:
    """Read an Ed25519 public key (PEM). Raises ValueError for any other content."""
    try:
        return VerifyKey.from_pem(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{path} is not an Ed25519 public key") from None


def load_or_create_signing_key(directory: Path) -> SigningKey:
    """The key in ``directory/audit.key``, made (mode 0600) if there is none."""
    path = Path(directory) / KEY_FILE
    if not path.exists():
        # Another process may have won the race: then read theirs.
        create_private(path, SigningKey.generate().expose_private_pem())
    try:
        return SigningKey.from_pem(path.read_bytes())
    except ValueError as exc:
        raise AuditCorrupt(f"{path} is {exc}") from exc


def ensure_public_key(directory: Path, key: SigningKey) -> Path:
    """Write ``audit.pub`` for ``key`` if missing; refuse if it names another key.

    A published key that no longer matches the signing key would make every later
    checkpoint fail verification, so the mismatch is an error at start-up.
    """
    path = Path(directory) / PUBLIC_KEY_FILE
    pem = key.public_key.pem()
    # Only a missing file is written: creating one writes a copy aside first, which on a
    # full disk fails and would stop a start that needs to write nothing here.
    if not path.exists():
        create_private(path, pem)  # False: another process made it first, read below
    if path.read_bytes() != pem:
        raise AuditCorrupt(f"{path} does not match {KEY_FILE}; restore the right pair")
    return path
