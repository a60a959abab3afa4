"""The audit log's file on disk: appending to it, cutting it back, and checking its tail.

:class:`AppendFile` is ``audit.jsonl`` opened for appending (created mode 0600 by
:mod:`cardvault.files`) and locked with ``flock``, so that two processes cannot write
one log. It appends every byte it is given, ``fsync``-s, and cuts the file back to a
length (fsynced too) after a failed write.

:func:`read_tail` is the check made when the log is opened: the last two lines parse as
records, their hashes match, the last links to the one before (or starts the chain),
a checkpoint among them verifies, and ``audit.head`` is a valid checkpoint that names no
record beyond the end nor another record at its number. Anything else raises
:class:`AuditCorrupt`, so that a service refuses to start rather than fork the chain.

The chain, the group commit and the checkpoints built on these are
:mod:`cardvault.audit.log`'s.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import NamedTuple

from cardvault.audit.errors import AuditCorrupt, AuditUnavailable
from cardvault.audit.record import GENESIS, AuditRecord, RecordInvalid
from cardvault.audit.signing import verify_checkpoint
from cardvault.crypto import VerifyKey
from cardvault.files import open_private_append, read_last_lines

__all__ = ["AppendFile", "Tail", "checkpoint_ok", "read_tail"]


class AppendFile:
    """The log's file descriptor: append all bytes and fsync, or cut back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> AppendFile:
        """``path`` opened for appending and locked, or :class:`AuditUnavailable`."""
        try:
            fd = open_private_append(path)
        except OSError as exc:
            raise AuditUnavailable("the audit log cannot be opened for writing") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise AuditUnavailable("another process has this audit log open") from exc
        return cls(fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def sync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class Tail(NamedTuple):
    """Where the chain on disk ends: what the next record continues from."""

    #: The last record's number (0 for an empty log).
    seq: int
    #: The last record's hash (:data:`~cardvault.audit.record.GENESIS` for an empty log).
    prev: str
    #: The file's length in bytes.
    size: int
    #: Whether the last record is a checkpoint (nothing after it is unsigned).
    last_is_checkpoint: bool


def read_tail(path: Path, head_path: Path, public_key: VerifyKey) -> Tail:
    """The end of the log at ``path``, checked against itself and ``head_path``, or raise
    :class:`AuditCorrupt` (a tail that is not a valid continuation) or
    :class:`AuditUnavailable` (the files cannot be read)."""
    try:
        size = path.stat().st_size
        lines, complete = read_last_lines(path, 2) if size else ([], True)
        head_line = head_path.read_bytes() if head_path.exists() else None
    except OSError as exc:
        raise AuditUnavailable("the audit log cannot be read") from exc
    if not complete:
        raise AuditCorrupt(
            f"{path} ends in a partial record (a crash during a write, or an edit); "
            "run `cardvault audit verify` and repair it before starting"
        )
    try:
        records = [AuditRecord.from_line(line) for line in lines]
        head = AuditRecord.from_line(head_line) if head_line is not None else None
    except RecordInvalid as exc:
        raise AuditCorrupt(f"the tail of {path} or {head_path} is invalid") from exc
    if not records:
        if head is not None:
            raise AuditCorrupt(f"{path} is empty but {head_path} names a record")
        return Tail(0, GENESIS, 0, False)
    last = records[-1]
    if len(records) == 2:
        before = records[0]
        linked = last.seq == before.seq + 1 and last.prev == before.hash
    else:
        linked = last.seq == 1 and last.prev == GENESIS
    if not linked:
        raise AuditCorrupt(f"the last two records of {path} are not chained")
    if last.is_checkpoint and not checkpoint_ok(last, public_key):
        raise AuditCorrupt(f"the last checkpoint of {path} does not verify")
    if head is not None:
        if not head.is_checkpoint or not checkpoint_ok(head, public_key):
            raise AuditCorrupt(f"{head_path} is not a valid checkpoint of this log")
        by_seq = {r.seq: r for r in records}
        if head.seq > last.seq:
            raise AuditCorrupt(
                f"{path} ends at record {last.seq} but its signed head is record "
                f"{head.seq}: records were cut off"
            )
        if head.seq in by_seq and by_seq[head.seq].hash != head.hash:
            raise AuditCorrupt(f"{head_path} does not match {path}")
    return Tail(last.seq, last.hash, size, last.is_checkpoint)


def checkpoint_ok(record: AuditRecord, public_key: VerifyKey) -> bool:
    """Whether ``record`` is a checkpoint this key signed for the record before it."""
    head, seq, sig = (record.detail.get(k) for k in ("head", "seq", "signature"))
    return (
        isinstance(head, str)
        and isinstance(seq, int)
        and isinstance(sig, str)
        and head == record.prev
        and seq == record.seq - 1
        and verify_checkpoint(public_key, head, seq, sig)
    )
