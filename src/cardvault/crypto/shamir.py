"""Shamir's secret sharing for the root key, with shares a custodian can write down.

Built on :mod:`cardvault.crypto.hazmat.shamir` (GF(2^8), byte by byte, so a 32-byte root
key splits whole; no dependency needed). This layer adds what the raw math lacks: each
share carries the split it belongs to, its index and the threshold, and a checksum, so
that a mistyped share, a share from another split, a repeated share or too few shares
are refused with a message a custodian can act on. None of this proves the rebuilt
secret right: a custodian could forge a share and its checksum. For that, compare the
rebuilt key with its stored check value (:func:`cardvault.crypto.verify_key_check_value`).

Text encoding of one share (``docs/crypto-formats.md`` has the details)::

    cvshare1-<split id: 8 hex>-<threshold>-<index>-<value: base32>-<checksum: 8 hex>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from typing import NoReturn, final

from cardvault.crypto.exceptions import InvalidShare
from cardvault.crypto.hazmat import shamir as _raw

__all__ = ["SHARE_PREFIX", "Share", "shamir_combine", "shamir_split"]

SHARE_PREFIX = "cvshare1"
_SPLIT_ID_BYTES = 4
# Four bytes of SHA-256 miss a random typo with probability 2**-32. It is a typo check,
# not authentication: anyone holding a share can recompute it for an altered share.
_CHECKSUM_BYTES = 4
_SHARE_RE = re.compile(
    r"(?P<body>cvshare1-(?P<split>[0-9a-f]{8})-(?P<threshold>[1-9][0-9]{0,2})"
    r"-(?P<index>[1-9][0-9]{0,2})-(?P<value>[a-z2-7]+))-(?P<check>[0-9a-f]{8})"
)


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).digest()[:_CHECKSUM_BYTES].hex()


@final
class Share:
    """One custodian's share. ``repr`` shows split id, index and threshold, never the value."""

    __slots__ = ("_value", "index", "split_id", "threshold")

    def __init__(
        self, *, split_id: bytes, threshold: int, index: int, value: bytes | bytearray
    ) -> None:
        if len(split_id) != _SPLIT_ID_BYTES:
            raise ValueError("a split id is 4 bytes")
        if not 2 <= threshold <= _raw.MAX_SHARES or not 1 <= index <= _raw.MAX_SHARES:
            raise ValueError("threshold must be 2..255 and index 1..255")
        if not value:
            raise ValueError("a share value must not be empty")
        self.split_id = bytes(split_id)
        self.threshold = threshold
        self.index = index
        # Taken over, not copied, like Key material: wipe() then zeroes the only copy.
        self._value = value if isinstance(value, bytearray) else bytearray(value)

    @property
    def value(self) -> bytearray:
        return self._value

    def to_text(self) -> str:
        """The share as one line for a custodian: lowercase, ASCII, checksummed."""
        encoded = base64.b32encode(bytes(self._value)).decode("ascii").rstrip("=").lower()
        body = f"{SHARE_PREFIX}-{self.split_id.hex()}-{self.threshold}-{self.index}-{encoded}"
        return f"{body}-{_checksum(body)}"

    @classmethod
    def from_text(cls, text: str) -> Share:
        """Parse :meth:`to_text`'s output. Whitespace anywhere and upper case are allowed,
        so that a share can be written in groups. Raises :class:`InvalidShare`."""
        compact = "".join(text.split()).lower()
        if not compact.startswith(SHARE_PREFIX + "-"):
            raise InvalidShare("not a cardvault share, or a share version this build cannot read")
        match = _SHARE_RE.fullmatch(compact)
        if match is None:
            raise InvalidShare("the share is malformed")
        expected = _checksum(match["body"]).encode("ascii")
        if not hmac.compare_digest(expected, match["check"].encode("ascii")):
            raise InvalidShare("the share's checksum does not match: it was mistyped")
        threshold, index = int(match["threshold"]), int(match["index"])
        if threshold < 2 or threshold > _raw.MAX_SHARES or index > _raw.MAX_SHARES:
            raise InvalidShare("the share's threshold or index is out of range")
        value = match["value"]
        try:
            raw = base64.b32decode(value.upper() + "=" * (-len(value) % 8))
        except binascii.Error:
            raise InvalidShare("the share is malformed") from None
        return cls(
            split_id=bytes.fromhex(match["split"]),
            threshold=threshold,
            index=index,
            value=bytearray(raw),
        )

    def wipe(self) -> None:
        """Zero the share value in place."""
        self._value[:] = bytes(len(self._value))

    def __repr__(self) -> str:
        return (
            f"Share(split_id={self.split_id.hex()!r}, index={self.index}, "
            f"threshold={self.threshold})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Share objects cannot be pickled or copied")


def shamir_split(
    secret: bytes | bytearray,
    shares: int,
    threshold: int,
    *,
    random_source_for_tests: Callable[[int], bytes] | None = None,
) -> list[Share]:
    """Split ``secret`` into ``shares`` shares, any ``threshold`` of which rebuild it.

    ``2 <= threshold <= shares <= 255``. A threshold of 1 is refused: every share would
    be the secret itself. ``random_source_for_tests`` exists only for known-answer tests;
    it is asked first for the 4-byte split id, then for the polynomial coefficients.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError("the secret must be bytes")
    random_bytes = random_source_for_tests or secrets.token_bytes
    split_id = bytes(random_bytes(_SPLIT_ID_BYTES))
    points = _raw.shamir_split(secret, shares, threshold, random_bytes)
    return [Share(split_id=split_id, threshold=threshold, index=x, value=y) for x, y in points]


def shamir_combine(shares: Iterable[Share]) -> bytearray:
    """Rebuild the secret from at least ``threshold`` shares of one split.

    Raises :class:`InvalidShare` for no shares, shares of different splits or
    thresholds, a share given twice, too few shares, or shares of different lengths.
    Verify the result with its key check value: a forged share still gives a wrong key.
    """
    given = list(shares)
    if not given:
        raise InvalidShare("no shares were given")
    first = given[0]
    if any(share.split_id != first.split_id for share in given):
        raise InvalidShare("the shares come from different splits")
    if any(share.threshold != first.threshold for share in given):
        raise InvalidShare("the shares disagree about the threshold")
    seen: set[int] = set()
    for share in given:
        if share.index in seen:
            raise InvalidShare(f"share {share.index} was given twice")
        seen.add(share.index)
    if len(given) < first.threshold:
        raise InvalidShare(f"{first.threshold} shares are needed, {len(given)} were given")
    if any(len(share.value) != len(first.value) for share in given):
        raise InvalidShare("the shares have different lengths")
    return _raw.shamir_combine([(share.index, share.value) for share in given])
