"""The service's audit signing key (Ed25519) and the checkpoint signature.

The key is ``audit.key`` (PKCS#8 PEM, mode 0600) in the service's state directory,
created on first use; its public half is ``audit.pub`` (SubjectPublicKeyInfo PEM) beside
the log, to be published. Signing and verifying use ``cryptography``'s Ed25519.

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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cardvault.audit._files import create_private
from cardvault.audit.errors import AuditCorrupt

__all__ = [
    "CHECKPOINT_CONTEXT",
    "KEY_FILE",
    "PUBLIC_KEY_FILE",
    "checkpoint_message",
    "ensure_public_key",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "public_key_pem",
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


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign_checkpoint(key: Ed25519PrivateKey, head: str, seq: int) -> str:
    return base64.b64encode(key.sign(checkpoint_message(head, seq))).decode("ascii")


def verify_checkpoint(public_key: Ed25519PublicKey, head: str, seq: int, signature: str) -> bool:
    """True when ``signature`` is this key's signature of (``head``, ``seq``)."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        public_key.verify(raw, checkpoint_message(head, seq))
    except (InvalidSignature, ValueError, binascii.Error, UnicodeEncodeError):
        return False
    return True


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM). Raises ValueError for any other content."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_signing_key(directory: Path) -> Ed25519PrivateKey:
    """The key in ``directory/audit.key``, made (mode 0600) if there is none."""
    path = Path(directory) / KEY_FILE
    if not path.exists():
        fresh = Ed25519PrivateKey.generate()
        pem = fresh.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        create_private(path, pem)  # another process may have won the race: read theirs
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise AuditCorrupt(f"{path} is not a readable, unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditCorrupt(f"{path} is not an Ed25519 private key")
    return key


def ensure_public_key(directory: Path, key: Ed25519PrivateKey) -> Path:
    """Write ``audit.pub`` for ``key`` if missing; refuse if it names another key.

    A published key that no longer matches the signing key would make every later
    checkpoint fail verification, so the mismatch is an error at start-up.
    """
    path = Path(directory) / PUBLIC_KEY_FILE
    pem = public_key_pem(key.public_key())
    if not create_private(path, pem) and path.read_bytes() != pem:
        raise AuditCorrupt(f"{path} does not match {KEY_FILE}; restore the right pair")
    return path
