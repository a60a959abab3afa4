"""The check a service makes of its audit log before it continues it.

A service that continues a log vouches for it: its next checkpoint signs every record
before it. So it must not continue a log that is not the chain it wrote, whether the
change is at the end or in the middle, and must not sign records it cannot vouch for.
:func:`check_log` answers where the chain continues (:class:`Opening`), or raises
:class:`AuditCorrupt` naming the problem and pointing to ``cardvault audit repair``.

How, with ``audit.tail`` (:mod:`cardvault.audit.tailfile`), the service's MAC-ed mark
of where its log ends:

1. The log's length and the SHA-256 of all its bytes (one pass, about 0.3 s per
   million records) must be those of one of the mark's two ends. That is the whole log
   exactly as the service wrote it, its unsigned last records included; a byte flipped,
   a line deleted, added or moved anywhere, a record changed with its hash recomputed
   or a cut, all fail here. A full walk of the chain like ``cardvault audit verify``
   does would find the same, at about 23 s per million records: too slow for every
   start.
2. ``audit.head`` must be there when the log holds a checkpoint, must be a checkpoint
   this key signed, and must be the record the log holds at its number (no later than
   the log's end).

When the log fails (1), the full walk (:func:`cardvault.audit.verify.verify_with_key`)
then runs to name the first problem as ``verify`` would: only on this path, where the
service refuses to start anyway.

A log without a mark (written before the mark existed, or whose mark was deleted) is
walked in full once, like ``verify``; it is adopted only when it verifies and ends with
a checkpoint, since nothing else can vouch for records after the last signature. A new
mark is then written.

Nothing is written when the check fails; never is a new ``audit.head`` written in place
of a missing one here (``cardvault audit repair`` does that, and records it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardvault.audit.errors import AuditCorrupt, AuditUnavailable
from cardvault.audit.logfile import TAIL_FILE, checkpoint_ok
from cardvault.audit.record import GENESIS, AuditRecord, RecordInvalid
from cardvault.audit.tailfile import EMPTY_END, LogEnd, MarkInvalid, TailMark, read_mark
from cardvault.audit.verify import verify_with_key
from cardvault.crypto import VerifyKey

__all__ = ["Opening", "Scan", "check_log", "mark_end", "repair_hint", "scan_log"]

_CHUNK = 1 << 20
#: Longest line captured by :func:`scan_log` (records are a few hundred bytes).
_MAX_LINE = 1 << 20


def repair_hint(path: Path) -> str:
    return (
        f"keep a copy of {path.parent} as found, then run `cardvault audit repair {path}` "
        "(docs/audit.md, 'Repair')"
    )


@dataclass
class Opening:
    """Where the chain continues."""

    end: LogEnd
    #: SHA-256 of the log's bytes up to ``end.size`` (to be continued as it grows).
    hasher: Any
    #: True when the log had no mark and was walked in full (or is new): a mark must be
    #: written for it.
    new_mark: bool


@dataclass
class Scan:
    """What one pass over a log's bytes found."""

    size: int
    hasher: Any
    #: The SHA-256 of the first ``n`` bytes, for each ``n`` asked for that the log reaches.
    digests: dict[int, str]
    #: The line asked for (1-based), newline included; None when the log has no such line.
    line: bytes | None


def scan_log(path: Path, sizes: tuple[int, ...] = (), line_number: int | None = None) -> Scan:
    """Hash the log at ``path`` in one pass, noting the digest of the first ``n`` bytes
    for each ``n`` in ``sizes``, and keep line ``line_number``."""
    hasher = hashlib.sha256()
    targets = sorted({n for n in sizes if n >= 0})
    digests: dict[int, str] = {}
    if 0 in targets:
        digests[0] = hasher.hexdigest()
    pos = newlines = 0
    line: bytes | None = None
    partial: bytearray | None = None
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            end = pos + len(chunk)
            start = 0
            for n in targets:
                if pos < n <= end:
                    hasher.update(chunk[start : n - pos])
                    start = n - pos
                    digests[n] = hasher.copy().hexdigest()
            hasher.update(chunk[start:])
            if line_number is not None and line is None:
                if partial is not None:
                    cut = chunk.find(b"\n")
                    partial += chunk if cut < 0 else chunk[: cut + 1]
                    if cut >= 0 or len(partial) > _MAX_LINE:
                        line = bytes(partial)
                else:
                    here = chunk.count(b"\n")
                    if newlines + here >= line_number - 1:
                        at = -1
                        for _ in range(line_number - 1 - newlines):
                            at = chunk.find(b"\n", at + 1)
                        cut = chunk.find(b"\n", at + 1)
                        if cut >= 0:
                            line = chunk[at + 1 : cut + 1]
                        elif at + 1 < len(chunk):
                            partial = bytearray(chunk[at + 1 :])
                        else:
                            partial = bytearray()
                    newlines += here
            pos = end
    if line is None and partial:
        line = bytes(partial)
    return Scan(pos, hasher, digests, line)


def check_log(
    path: Path, head_path: Path, tail_path: Path, public_key: VerifyKey, mark_key: bytes
) -> Opening:
    """Where the chain of the log at ``path`` continues (module docstring), or raise
    :class:`AuditCorrupt` (it is not the chain this service wrote, or it cannot vouch for
    it) or :class:`AuditUnavailable` (the files cannot be read)."""
    try:
        size = path.stat().st_size
        head_line = head_path.read_bytes() if head_path.exists() else None
        try:
            mark = read_mark(tail_path, mark_key)
        except MarkInvalid as exc:
            reason = (
                f"mark_invalid: {tail_path.name} is not this service's mark of where the log "
                f"ends ({exc})"
            )
            raise AuditCorrupt(
                f"{path}: {reason}. The service will not continue this log: {repair_hint(path)}",
                kind="mark_invalid",
                reason=reason,
            ) from None
        if mark is None:
            return _adopt(path, head_path, public_key, size, head_line)
        scan = scan_log(
            path,
            (mark.durable.size, mark.writing.size),
            _head_seq(head_line),
        )
    except OSError as exc:
        raise AuditUnavailable("the audit log cannot be read") from exc
    end = mark_end(mark, scan)
    if end is None:
        raise _refused(path, head_path, public_key, _differs(mark, scan))
    why = _head_problem(head_path, head_line, end, scan.line, public_key)
    if why is not None:
        raise _refused(path, head_path, public_key, why, walk=False)
    return Opening(end, scan.hasher, new_mark=False)


def mark_end(mark: TailMark, scan: Scan) -> LogEnd | None:
    """The end of the two the mark allows that the scanned log is, if either."""
    for end in (mark.writing, mark.durable):
        if end.size == scan.size and scan.digests.get(end.size) == end.sha256:
            return end
    return None


def _head_seq(head_line: bytes | None) -> int | None:
    if head_line is None:
        return None
    try:
        return AuditRecord.from_line(head_line).seq
    except RecordInvalid:
        return None


def _head_problem(
    head_path: Path,
    head_line: bytes | None,
    end: LogEnd,
    line: bytes | None,
    public_key: VerifyKey,
) -> tuple[str, str] | None:
    """What is wrong with ``audit.head`` for a log that ends at ``end`` (kind, why), if
    anything."""
    name = head_path.name
    if head_line is None:
        if end.checkpoint_seq:
            return (
                "head_missing",
                f"the log holds checkpoints (the newest is record "
                f"{end.checkpoint_seq}) but {name} is missing, so a cut-off log could not "
                "be told from a whole one; the service will not write a new one by itself",
            )
        return None
    try:
        head = AuditRecord.from_line(head_line)
    except RecordInvalid as exc:
        return "head_mismatch", f"{name} is not a valid record ({exc})"
    if not head.is_checkpoint or not checkpoint_ok(head, public_key):
        return "head_mismatch", f"{name} is not a checkpoint signed by this service's key"
    if head.seq > end.seq:
        return (
            "truncated",
            f"the log ends at record {end.seq} but {name} holds signed checkpoint "
            f"{head.seq}: records were cut off",
        )
    try:
        at = AuditRecord.from_line(line) if line is not None else None
    except RecordInvalid:
        at = None
    if at is None or at.hash != head.hash:
        return (
            "head_mismatch",
            f"record {head.seq} of the log is not the checkpoint {name} "
            "holds: the log was replaced or rewritten",
        )
    return None


def _differs(mark: TailMark, scan: Scan) -> tuple[str, str]:
    """How the log differs from the two ends the mark allows (kind, why)."""
    durable, writing = mark.durable, mark.writing
    size = scan.size
    if size < durable.size:
        return (
            "truncated",
            f"the log is {size} bytes long but this service had written "
            f"{durable.size} bytes (through record {durable.seq}): records were cut off",
        )
    if durable.size < size < writing.size:
        return (
            "truncated",
            f"the log ends inside the last write this service began (bytes "
            f"{durable.size} to {writing.size}, records {durable.seq + 1} to {writing.seq}): "
            "a crash or a full disk cut it short, and those records were never acknowledged",
        )
    if size > writing.size and scan.digests.get(writing.size) == writing.sha256:
        return (
            "unvouched",
            f"the records after record {writing.seq} (from byte {writing.size}) "
            f"were not written by this service as far as {TAIL_FILE} shows, and no checkpoint "
            "signs them: a forged record, or records written just before a power cut. "
            "An unsigned record it cannot vouch for is never adopted",
        )
    newest = max(durable.checkpoint_seq, writing.checkpoint_seq)
    after = f" after checkpoint {newest}" if newest else ""
    return (
        "edited",
        f"the log is not the one this service wrote, though its chain and signatures "
        f"verify: the unsigned records{after} were changed with their hashes recomputed, "
        "or replaced",
    )


def _refused(
    path: Path,
    head_path: Path,
    public_key: VerifyKey,
    fallback: tuple[str, str],
    *,
    walk: bool = True,
) -> AuditCorrupt:
    """The error that refuses the log: the first problem ``verify`` finds, if it finds one
    (a full walk, on this path only), else ``fallback`` (kind, why)."""
    kind, found = fallback
    found = f"{kind}: {found}"
    if walk:
        try:
            result = verify_with_key(path, public_key, head_path=head_path)
        except OSError:
            result = None
        if result is not None and result.problem is not None:
            kind, found = result.problem.kind.value, str(result.problem)
    return AuditCorrupt(
        f"{path}: {found}. The service will not continue this log: {repair_hint(path)}",
        kind=kind,
        reason=found,
    )


def _adopt(
    path: Path, head_path: Path, public_key: VerifyKey, size: int, head_line: bytes | None
) -> Opening:
    """A log without a mark: new, or walked in full and adopted only if every record is
    signed (see the module docstring)."""
    if size == 0 and head_line is None:
        return Opening(EMPTY_END, hashlib.sha256(), new_mark=True)
    result = verify_with_key(path, public_key, head_path=head_path)
    if result.problem is not None:
        raise AuditCorrupt(
            f"{path}: {result.problem}. The service will not continue this log: "
            f"{repair_hint(path)}",
            kind=result.problem.kind.value,
            reason=str(result.problem),
        )
    if result.unsigned > 0:
        first = result.signed_seq + 2 if result.signed_seq is not None else 1
        span = (
            f"record {first} follows"
            if first == result.last_seq
            else f"records {first} to {result.last_seq} follow"
        )
        reason = (
            f"unvouched: {span} the last signed checkpoint, and there is no {TAIL_FILE} to "
            "show that this service wrote them; an unsigned record it cannot vouch for is "
            "never adopted"
        )
        raise AuditCorrupt(
            f"{path}: {reason}. The service will not continue this log: {repair_hint(path)}",
            kind="unvouched",
            reason=reason,
        )
    scan = scan_log(path)
    signed = result.checkpoints > 0
    end = LogEnd(
        size=scan.size,
        sha256=scan.hasher.hexdigest(),
        seq=result.last_seq,
        hash=result.last_hash,
        checkpoint_seq=result.last_seq if signed else 0,
        checkpoint_hash=result.last_hash if signed else GENESIS,
    )
    return Opening(end, scan.hasher, new_mark=True)
