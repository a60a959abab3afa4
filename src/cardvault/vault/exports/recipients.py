"""The static export allowlist: who may receive a card export, and their keys.

The file (``[exports] recipients_file``, TOML) is read once at start-up, like
forwarding's allowlist; nobody can name a new recipient or key at run time::

    [[recipient]]
    name = "stripe-migrations"          # what --to names
    fingerprint = "0123…89AB"           # the key's fingerprint, 40 hex digits
    public_key_file = "stripe.asc"      # relative to this file's folder

Each recipient's key file is read and checked here: it must hold exactly one key,
whose fingerprint is the one configured (checked by the operator through another
channel, as Stripe's migrations team asks), RSA of at least 4096 bits throughout, and
able to encrypt. A recipient that fails a check stays listed, marked unusable with
the reason: an export to it is refused (and audited), and the start-up log names it.
A file that cannot be read or parsed, or names a recipient twice, is a configuration
error: the vault does not start.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cardvault import pgp
from cardvault.errors import ConfigurationError
from cardvault.logging import get_logger

__all__ = ["Recipient", "Recipients", "load_recipients"]

_log = get_logger("cardvault.vault")
_MAX_FILE_BYTES = 1024 * 1024
_MAX_KEY_BYTES = 256 * 1024
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_FINGERPRINT = re.compile(r"[0-9A-F]{40}")


@dataclass(frozen=True)
class Recipient:
    name: str
    fingerprint: str
    #: Armored (or binary, as text) public key; empty when it could not be read.
    public_key: str
    #: Why this recipient may not receive an export (``fingerprint_mismatch``,
    #: ``key_refused``, ``key_unreadable``); None when it may.
    refused: str | None = None
    detail: str = ""

    @property
    def key_id(self) -> str:
        """The OpenPGP key id (the fingerprint's last 16 hex digits), for the audit
        log, which refuses longer hex strings."""
        return f"pgp_{self.fingerprint[-16:]}"


@dataclass(frozen=True)
class Recipients:
    by_name: dict[str, Recipient]
    sha256: str = ""

    def get(self, name: str) -> Recipient | None:
        return self.by_name.get(name)


def _check_key(name: str, fingerprint: str, key_file: Path) -> Recipient:
    try:
        with key_file.open("rb") as fh:
            data = fh.read(_MAX_KEY_BYTES + 1)
        if len(data) > _MAX_KEY_BYTES:
            raise ValueError("larger than 256 KiB")
        text = data.decode("ascii")
    except (OSError, ValueError) as exc:
        reason = "the key file cannot be read" if isinstance(exc, OSError) else str(exc)
        return Recipient(name, fingerprint, "", "key_unreadable", reason)
    try:
        info = pgp.inspect_public_key(text)
    except pgp.PgpError:
        return Recipient(name, fingerprint, "", "key_unreadable", "gpg could not read the key")
    if not info.fingerprint:  # not exactly one key
        return Recipient(name, fingerprint, "", "key_refused", "; ".join(info.problems))
    if info.fingerprint != fingerprint:
        return Recipient(
            name, fingerprint, "", "fingerprint_mismatch",
            "the key file's fingerprint is not the one configured",
        )  # fmt: skip
    if info.problems:
        return Recipient(name, fingerprint, "", "key_refused", "; ".join(info.problems))
    return Recipient(name, fingerprint, text)


def load_recipients(path: Path) -> Recipients:
    """Read and check the recipients file at ``path`` (module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"exports.recipients_file {path} cannot be read") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigurationError(f"exports.recipients_file {path} is larger than 1 MiB")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"exports.recipients_file {path} is not valid TOML") from exc
    entries = document.get("recipient", [])
    unknown = set(document) - {"recipient"}
    if unknown or not isinstance(entries, list):
        raise ConfigurationError(
            f"exports.recipients_file {path}: only [[recipient]] tables are allowed"
        )
    found: dict[str, Recipient] = {}
    for number, entry in enumerate(entries, 1):
        where = f"exports.recipients_file {path}, recipient {number}"
        if not isinstance(entry, dict) or set(entry) != {"name", "fingerprint", "public_key_file"}:
            raise ConfigurationError(f"{where}: give exactly name, fingerprint and public_key_file")
        name, fingerprint, key_file = entry["name"], entry["fingerprint"], entry["public_key_file"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"{where}: name is 1 to 64 of a-z 0-9 _ . - (starting with a letter or digit)"
            )
        if name in found:
            raise ConfigurationError(f"{where}: the name {name} is given twice")
        compact = "".join(str(fingerprint).split()).upper() if isinstance(fingerprint, str) else ""
        if not _FINGERPRINT.fullmatch(compact):
            raise ConfigurationError(f"{where}: fingerprint is the key's 40 hex digits")
        if not isinstance(key_file, str) or not key_file:
            raise ConfigurationError(f"{where}: public_key_file is a path")
        recipient = _check_key(name, compact, path.parent / key_file)
        if recipient.refused:
            _log.error(
                "export recipient refused",
                recipient=name,
                reason=recipient.refused,
                detail=recipient.detail,
            )
        found[name] = recipient
    _log.info(
        "export recipients loaded",
        recipients=len(found),
        usable=sum(1 for r in found.values() if r.refused is None),
    )
    return Recipients(found, hashlib.sha256(data).hexdigest())
