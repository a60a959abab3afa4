"""``audit.tail``: the service's own mark of where its log ends, so that it can tell the
records it wrote itself from anyone else's when it opens the log again.

Checkpoints are signed every ``checkpoint_every`` records or ``checkpoint_interval``
seconds, so after a crash the last records of a log are vouched for by no signature.
They are genuine (the service wrote them, and their requests may have been answered),
but a record someone added or changed after the last checkpoint, with its hash
recomputed, chains just as well. The mark is what tells them apart.

Before every write of the log, the writer replaces the mark with two ends of the log
(:class:`LogEnd`): where it ends now (``durable``), and where it will end once this
write is done (``writing``); once the write is fsynced, with the new end alone (so that
a log cut back by one write is not an end the mark allows). Each end is the log's length
in bytes, the SHA-256 of those bytes, the last record's number and hash, and the newest
checkpoint's number and hash.
The mark carries an HMAC-SHA256 under a key only the holder of ``audit.key`` can derive
(the SHA-256 of the Ed25519 signature, deterministic, of a fixed text), so nobody
without the signing key can write a valid mark.

On opening, the log must be exactly one of the two ends: its length and the SHA-256 of
its bytes (read in one pass, about 0.3 s for 425 MB) must match. A crash before the
write leaves the ``durable`` end, a crash after it the ``writing`` end; any other
content (a byte flipped anywhere, a line deleted, added or moved, an unsigned record
changed with its hash recomputed, a cut) matches neither.

The mark is written with one ``pwrite`` of :data:`MARK_SIZE` bytes at offset 0 (two per
write of the log, a few microseconds), and not fsynced: a process that is killed (``kill -9``, the OOM killer) leaves it in the page
cache, complete. A power cut may lose its last update while the log's fsynced lines
survive; the log then ends after the mark, and the service refuses to start until an
operator runs ``cardvault audit repair`` (see ``docs/audit.md``). Fsyncing it would cost
a second fsync per write of the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cardvault.audit.record import GENESIS
from cardvault.crypto import SigningKey, sign
from cardvault.files import ensure_private_file

__all__ = [
    "EMPTY_END",
    "MARK_SIZE",
    "LogEnd",
    "MarkInvalid",
    "TailFile",
    "TailMark",
    "decode_mark",
    "encode_mark",
    "mark_key",
    "read_mark",
]

#: The mark's length: always the same, so that each ``pwrite`` replaces all of it.
MARK_SIZE: Final = 1024
_VERSION: Final = 1
_KEY_CONTEXT: Final = b"cardvault audit tail mark key v1\x00"
_EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


class MarkInvalid(ValueError):
    """``audit.tail`` is not a mark this service wrote (unreadable, or its MAC fails)."""


@dataclass(frozen=True, slots=True)
class LogEnd:
    """One end of the log: what its bytes up to ``size`` are."""

    #: The log's length in bytes.
    size: int
    #: The SHA-256 (hex) of those bytes.
    sha256: str
    #: The last record's number (0: no record) and hash (GENESIS: no record).
    seq: int
    hash: str
    #: The newest checkpoint's number (0: none) and hash (GENESIS: none).
    checkpoint_seq: int
    checkpoint_hash: str

    @property
    def unsigned(self) -> int:
        """Records after the newest checkpoint."""
        return self.seq - self.checkpoint_seq

    def _json(self) -> str:
        return (
            f'{{"checkpoint_hash":"{self.checkpoint_hash}","checkpoint_seq":{self.checkpoint_seq},'
            f'"hash":"{self.hash}","seq":{self.seq},"sha256":"{self.sha256}","size":{self.size}}}'
        )

    @classmethod
    def _from(cls, value: Any) -> LogEnd:
        if not isinstance(value, dict) or set(value) != {
            "size", "sha256", "seq", "hash", "checkpoint_seq", "checkpoint_hash",
        }:  # fmt: skip
            raise MarkInvalid("not a log end")
        ints = (value["size"], value["seq"], value["checkpoint_seq"])
        texts = (value["sha256"], value["hash"], value["checkpoint_hash"])
        if not all(type(v) is int and v >= 0 for v in ints) or not all(
            isinstance(v, str) and len(v) == 64 for v in texts
        ):
            raise MarkInvalid("not a log end")
        return cls(
            value["size"], value["sha256"], value["seq"], value["hash"],
            value["checkpoint_seq"], value["checkpoint_hash"],
        )  # fmt: skip


#: The end of an empty log.
EMPTY_END: Final = LogEnd(0, _EMPTY_SHA256, 0, GENESIS, 0, GENESIS)


@dataclass(frozen=True, slots=True)
class TailMark:
    """The two ends the log may have: before the write in progress, and after it."""

    durable: LogEnd
    writing: LogEnd


def mark_key(key: SigningKey) -> bytes:
    """The MAC key of ``audit.tail``: derived from the signing key, by no one else."""
    return hashlib.sha256(sign(key, _KEY_CONTEXT)).digest()


def _body(mark: TailMark) -> bytes:
    return (
        f'{{"durable":{mark.durable._json()},"v":{_VERSION},"writing":{mark.writing._json()}}}'
    ).encode("ascii")


def encode_mark(mark: TailMark, key: bytes) -> bytes:
    """The file's :data:`MARK_SIZE` bytes: the body, its MAC, spaces, a newline."""
    body = _body(mark)
    mac = hmac.new(key, body, hashlib.sha256).hexdigest()
    text = body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}'
    return text.ljust(MARK_SIZE - 1) + b"\n"


def decode_mark(data: bytes, key: bytes) -> TailMark:
    """The mark in ``data``, or :class:`MarkInvalid`."""
    if len(data) != MARK_SIZE:
        raise MarkInvalid(f"it is {len(data)} bytes long, not {MARK_SIZE}")
    try:
        value = json.loads(data)
    except ValueError:
        raise MarkInvalid("it is not JSON") from None
    if not isinstance(value, dict) or value.get("v") != _VERSION or set(value) != {
        "v", "durable", "writing", "mac",
    }:  # fmt: skip
        raise MarkInvalid("it is not a mark of this version")
    mark = TailMark(LogEnd._from(value["durable"]), LogEnd._from(value["writing"]))
    mac = value["mac"]
    expected = hmac.new(key, _body(mark), hashlib.sha256).hexdigest()
    if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
        raise MarkInvalid("its MAC does not verify: this service did not write it")
    return mark


def read_mark(path: Path, key: bytes) -> TailMark | None:
    """The mark at ``path``; None when there is none (or an empty file). Raises
    :class:`MarkInvalid`, or ``OSError`` when it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    return decode_mark(data, key)


class TailFile:
    """``audit.tail`` open for replacing its mark in place."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> TailFile:
        """Open (creating it 0600 if missing; a link is refused) for writing."""
        ensure_private_file(path)
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW))

    def write(self, data: bytes) -> None:
        """Replace the mark (``data`` is :data:`MARK_SIZE` bytes) with one ``pwrite``."""
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], done)

    def close(self) -> None:
        os.close(self.fd)
