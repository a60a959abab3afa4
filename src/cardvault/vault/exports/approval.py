"""Custodian approval of card exports: k of n export-approval shares (docs/migration.md,
"Approval").

The ceremony (:func:`split`, ``cardvault export-approval create``) makes a random
approval key, splits it into ``n`` Shamir shares (any ``k`` rebuild it) for the
custodians, and keeps only a check of it: a constant sealed under it (AES-GCM, so a key
that merely shares a short check value is no match). The check goes into the vault's
configuration (``[exports] approval_file``), which is static like the recipients: the
vault holds no share and no key, only what tells a right key from a wrong one.

:class:`Approvals` holds the shares custodians submit for one export (an account, a
mode, a recipient) in memory only, for at most ``timeout`` seconds, as the key
service holds a destruction's approvals. A share that does not fit (another split,
malformed, given twice) or ``k`` shares that rebuild a wrong key wipe **every**
approval, pending or granted. ``k`` fitting shares grant the export once, for
``timeout`` seconds. A restart forgets all of it.

The key service's own custodian shares cannot approve an export: they are of another
split, and sending shares of keyd's root key to the card-data environment would let it
rebuild that key.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardvault import crypto
from cardvault.errors import ConfigurationError

__all__ = ["ApprovalCheck", "Approvals", "Progress", "Target", "load_check", "split"]

_KEY_NAME = "export-approval"
_CHECK = b"cardvault export approval v1"
_KIND = "cardvault.export_approval"
#: One export: (account, mode, recipient name).
Target = tuple[str, str, str]


def _context(split_id: str) -> dict[str, str]:
    return {"approval": "export", "split": split_id}


@dataclass(frozen=True)
class ApprovalCheck:
    """What the vault keeps of the ceremony: the split's id and threshold, the check."""

    split_id: str
    shares: int
    threshold: int
    check: bytes

    def verify(self, material: bytearray) -> None:
        """Raises :class:`crypto.InvalidShare` unless ``material`` (what K shares
        rebuilt) is the approval key. Wipes ``material``."""
        with crypto.Key(_KEY_NAME, 1, material) as key:
            try:
                plain = crypto.open_(key, self.check, _context(self.split_id))
            except crypto.InvalidCiphertext:
                raise crypto.InvalidShare("the shares rebuild the wrong key") from None
        if plain != _CHECK:
            raise crypto.InvalidShare("the shares rebuild the wrong key")

    def to_json(self) -> str:
        return json.dumps(
            {"kind": _KIND, "split_id": self.split_id, "shares": self.shares,
             "threshold": self.threshold,
             "check": base64.b64encode(self.check).decode("ascii")},
            indent=2,
        ) + "\n"  # fmt: skip


def split(shares: int, threshold: int) -> tuple[ApprovalCheck, list[crypto.Share]]:
    """The ceremony: a fresh approval key split into ``shares`` (any ``threshold``
    rebuild it); returns the check to configure and the shares to hand out once."""
    if not 2 <= threshold <= shares <= 16:
        raise ValueError("threshold is at least 2, and at most shares (at most 16)")
    with crypto.Key.generate(_KEY_NAME, 1) as key:
        out = crypto.shamir_split(key.expose_secret(), shares, threshold)
        split_id = out[0].split_id.hex()
        check = crypto.seal(key, _CHECK, _context(split_id))
    return ApprovalCheck(split_id, shares, threshold, check), out


def load_check(path: Path) -> ApprovalCheck:
    """The approval file written by the ceremony; a :class:`ConfigurationError` when it
    cannot be read or is not one."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if document.get("kind") != _KIND:
            raise ValueError("not an export approval file")
        check = ApprovalCheck(
            str(document["split_id"]),
            int(document["shares"]),
            int(document["threshold"]),
            base64.b64decode(document["check"], validate=True),
        )
        if not 2 <= check.threshold <= check.shares or not 4 <= len(check.split_id) <= 64:
            raise ValueError("threshold or split id out of range")
        bytes.fromhex(check.split_id)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"exports.approval_file {path} is not an export approval file "
            "(`cardvault export-approval create` writes one)"
        ) from exc
    return check


@dataclass(frozen=True)
class Progress:
    """The answer to one submitted share."""

    progress: int
    threshold: int
    approved: bool
    expires_in: int


class Approvals:
    """Export approvals in memory (module docstring)."""

    def __init__(
        self,
        check: ApprovalCheck,
        *,
        timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.timeout = timeout
        self._clock = clock
        self._pending: dict[Target, tuple[float, list[crypto.Share]]] = {}
        self._granted: dict[Target, float] = {}

    def wipe(self) -> None:
        """Forget every approval, pending and granted."""
        for _, shares in self._pending.values():
            for share in shares:
                share.wipe()
        self._pending = {}
        self._granted = {}

    def _expire(self) -> None:
        now = self._clock()
        for target, (since, shares) in list(self._pending.items()):
            if now - since > self.timeout:
                for share in shares:
                    share.wipe()
                del self._pending[target]
        for target, until in list(self._granted.items()):
            if now > until:
                del self._granted[target]

    def submit(self, target: Target, text: str) -> tuple[Progress, int]:
        """Add one custodian's share for ``target``; returns the progress and the
        share's index. Raises :class:`crypto.InvalidShare` (every approval wiped) for
        a share that does not fit or K shares that rebuild a wrong key."""
        self._expire()
        try:
            share = crypto.Share.from_text(text)
            if share.split_id.hex() != self.check.split_id or share.threshold != (
                self.check.threshold
            ):
                raise crypto.InvalidShare("the share belongs to another split")
            since, pending = self._pending.get(target, (self._clock(), []))
            if any(p.index == share.index for p in pending):
                raise crypto.InvalidShare("this share was already submitted")
        except crypto.InvalidShare:
            self.wipe()
            raise
        pending.append(share)
        self._pending[target] = (since, pending)
        index = share.index
        if len(pending) < self.check.threshold:
            return Progress(len(pending), self.check.threshold, False, 0), index
        del self._pending[target]
        try:
            self.check.verify(crypto.shamir_combine(pending))
        except crypto.InvalidShare:
            self.wipe()
            raise
        finally:
            for p in pending:
                p.wipe()
        self._granted[target] = self._clock() + self.timeout
        return Progress(self.check.threshold, self.check.threshold, True, int(self.timeout)), index

    def take(self, target: Target) -> bool:
        """Whether ``target`` is approved now; the approval is used up (one export per
        approval)."""
        self._expire()
        return self._granted.pop(target, None) is not None

    def status(self, target: Target) -> dict[str, Any]:
        self._expire()
        _, pending = self._pending.get(target, (0.0, []))
        return {"progress": len(pending), "threshold": self.check.threshold,
                "approved": target in self._granted}  # fmt: skip
