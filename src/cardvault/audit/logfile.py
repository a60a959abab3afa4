"""The audit log's files on disk: their names, and appending to the log.

:class:`AppendFile` is ``audit.jsonl`` opened for appending (created mode 0600 by
:mod:`cardvault.files`) and locked with ``flock``, so that two processes cannot write
one log. It appends every byte it is given, ``fsync``-s, and cuts the file back to a
length (fsynced too) after a failed write.

The check made when the log is opened is :mod:`cardvault.audit.opening`'s; the mark of
where the log ends, ``audit.tail``, is :mod:`cardvault.audit.tailfile`'s; the chain, the
group commit and the checkpoints are :mod:`cardvault.audit.log`'s.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

from cardvault.audit.errors import AuditUnavailable
from cardvault.audit.record import AuditRecord
from cardvault.audit.signing import verify_checkpoint
from cardvault.crypto import VerifyKey
from cardvault.files import open_private_append

__all__ = ["HEAD_FILE", "LOG_FILE", "TAIL_FILE", "AppendFile", "checkpoint_ok"]

#: The log: one record per line.
LOG_FILE: Final = "audit.jsonl"
#: A copy of the newest checkpoint record, replaced after each checkpoint.
HEAD_FILE: Final = "audit.head"
#: The service's MAC-ed mark of where the log ends (:mod:`cardvault.audit.tailfile`).
TAIL_FILE: Final = "audit.tail"


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
