"""Verifying an audit log, and exporting it.

:func:`verify_log` walks the log from the first line and stops at the first place where
it stops being the chain the service wrote. It reports that place as a
:class:`Problem`: its kind, the line number (1-based; in an untouched log line *n* holds
record *n*), the record number concerned, and a sentence.

How each kind is found:

``malformed``      a line that is not a record at all.
``edited``         a record whose hash does not match its content, or whose text was
                   rewritten; or a record whose hash was recomputed after an edit, which
                   the next record exposes (it still holds the old hash as its ``prev``).
``deleted``        record numbers jump forward and the missing records are nowhere near.
``inserted``       a record that is not part of the chain: the records around it link
                   to each other past it (a forged record, even with a correct hash of
                   its own, or a copied one).
``reordered``      records out of order: the missing records turn up a little later.
``truncated``      the last line is a partial record, or the log ends before the record
                   that ``audit.head`` (the latest signed checkpoint) names.
``bad_signature``  a checkpoint whose signature does not verify with the public key, that
                   another key signed, or that does not sign the record before it.
``head_mismatch``  ``audit.head`` is not a valid checkpoint, or the log holds another
                   record at its number: the log was replaced or rewritten.
``head_missing``   the log holds checkpoints but there is no ``audit.head`` beside it.

Telling deletion from reordering and insertion looks at up to :data:`WINDOW` records on
either side of the break. Whatever the kind, the break itself is always found.

What cannot be found: someone who can write the file can rewrite everything after the
last checkpoint named by ``audit.head`` (or append records after it) and recompute the
hashes; only a signature can vouch for records, and only the service's key can sign.
Someone who can also rewrite ``audit.head`` can roll it back to an older checkpoint and
cut the log there. Keep a copy of the heads away from the host (see ``docs/audit.md``).
A log rewritten in full with recomputed hashes fails at its first checkpoint (reported
there, not at the edit).
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

from cardvault.audit.errors import AuditCorrupt
from cardvault.audit.logfile import HEAD_FILE
from cardvault.audit.record import (
    GENESIS,
    RECORD_DEPTH,
    AuditRecord,
    RecordInvalid,
    json_nesting_exceeds,
)
from cardvault.audit.signing import key_id, load_public_key, verify_checkpoint
from cardvault.crypto import VerifyKey

__all__ = [
    "WINDOW",
    "Problem",
    "ProblemKind",
    "VerifyResult",
    "export",
    "verify_log",
    "verify_with_key",
]

#: Records looked at on either side of a break to tell what happened there.
WINDOW: Final = 1024
#: Longest line read whole; a longer one is malformed (records are a few hundred bytes).
_MAX_LINE: Final = 1 << 20
_CHECKPOINT_KEYS: Final = frozenset({"head", "seq", "signature", "key_id"})


class ProblemKind(StrEnum):
    MALFORMED = "malformed"
    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    BAD_SIGNATURE = "bad_signature"
    HEAD_MISMATCH = "head_mismatch"
    HEAD_MISSING = "head_missing"


@dataclass(frozen=True, slots=True)
class Problem:
    """The first place where the log is not what the service wrote."""

    kind: ProblemKind
    #: 1-based line of the log (None when the problem is in ``audit.head`` alone).
    line: int | None
    #: The record number concerned (the one edited, the first one missing, ...), if known.
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{self.kind}: {where}{self.message}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    path: Path
    #: Lines that verified before the first problem (all of them when ``ok``).
    records: int
    #: The last record number that verified (0 if none).
    last_seq: int
    #: That record's hash (GENESIS if none).
    last_hash: str
    #: Valid checkpoints seen.
    checkpoints: int
    #: The last record number covered by a valid checkpoint signature, if any.
    signed_seq: int | None
    #: The record number ``audit.head`` names, if there is a valid one.
    head_seq: int | None
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint: not yet vouched for by a signature."""
        return self.last_seq - (self.signed_seq + 1 if self.signed_seq is not None else 0)


class _Lines:
    """Numbered lines of a file, with look-ahead."""

    def __init__(self, fh: IO[bytes], on_bytes: Callable[[int], None] | None = None) -> None:
        self._fh = fh
        self._ahead: deque[tuple[int, bytes]] = deque()
        self._count = 0
        self._on_bytes = on_bytes

    def _read(self) -> tuple[int, bytes] | None:
        raw = self._fh.readline(_MAX_LINE)
        if not raw:
            return None
        self._count += 1
        if self._on_bytes is not None:
            self._on_bytes(len(raw))
        return self._count, raw

    def next(self) -> tuple[int, bytes] | None:
        return self._ahead.popleft() if self._ahead else self._read()

    def peek(self, count: int) -> list[tuple[int, bytes]]:
        while len(self._ahead) < count and (item := self._read()) is not None:
            self._ahead.append(item)
        return list(itertools.islice(self._ahead, count))


def _parse_quietly(raw: bytes) -> AuditRecord | None:
    try:
        return AuditRecord.from_line(raw)
    except RecordInvalid:
        return None


def _checkpoint_problem(record: AuditRecord, public_key: VerifyKey, kid: str) -> str | None:
    detail = record.detail
    if set(detail) != _CHECKPOINT_KEYS:
        return "the checkpoint's detail is not head, seq, signature and key_id"
    head, seq, signature, signer = (detail[k] for k in ("head", "seq", "signature", "key_id"))
    if head != record.prev or seq != record.seq - 1:
        return f"checkpoint {record.seq} does not sign the record before it"
    if signer != kid:
        return f"checkpoint {record.seq} names another signing key ({signer!s:.40})"
    if not (
        isinstance(head, str)
        and isinstance(seq, int)
        and isinstance(signature, str)
        and verify_checkpoint(public_key, head, seq, signature)
    ):
        return f"the signature of checkpoint {record.seq} does not verify with the public key"
    return None


def _read_head(
    head_path: Path, public_key: VerifyKey, kid: str
) -> tuple[AuditRecord | None, Problem | None]:
    if not head_path.exists():
        return None, None
    try:
        head = AuditRecord.from_line(head_path.read_bytes())
    except (RecordInvalid, OSError):
        return None, Problem(
            ProblemKind.HEAD_MISMATCH, None, None, f"{head_path.name} is not a valid record"
        )
    if not head.is_checkpoint:
        return None, Problem(
            ProblemKind.HEAD_MISMATCH, None, head.seq, f"{head_path.name} is not a checkpoint"
        )
    why = _checkpoint_problem(head, public_key, kid)
    if why is not None:
        return None, Problem(ProblemKind.HEAD_MISMATCH, None, head.seq, f"{head_path.name}: {why}")
    return head, None


#: A record and the 1-based line it is on.
_Numbered = tuple[int, AuditRecord]


def _classify(
    prev: AuditRecord | None,
    prev_line: int,
    record: AuditRecord,
    line: int,
    behind: deque[_Numbered],
    ahead: list[_Numbered],
) -> Problem:
    """What happened where ``record`` (on ``line``) does not continue the chain from ``prev``.

    ``behind`` holds the records that verified before it, ``ahead`` the lines after it
    that parse as records (up to :data:`WINDOW` of each). The cases are tried in this
    order, each by its own function below."""
    if prev is None:
        return _first_record_wrong(record, line, ahead)
    expected = prev.seq + 1
    following = ahead[0][1] if ahead and ahead[0][0] == line + 1 else None
    resumed = _chain_resumes_below(prev, expected, record, line, ahead)
    if resumed is not None:
        return resumed
    if record.seq > expected:
        return _numbers_jump_forward(expected, record, line, ahead)
    if record.seq == expected:
        return _link_broken(prev, prev_line, record, line, following)
    return _numbers_go_back(prev, record, line, behind, following)


def _first_record_wrong(record: AuditRecord, line: int, ahead: list[_Numbered]) -> Problem:
    """The first line is not record 1 starting the chain."""
    if record.seq > 1:
        if any(r.seq < record.seq for _, r in ahead):
            return Problem(
                ProblemKind.REORDERED, line, record.seq, f"record {record.seq} comes first"
            )
        return Problem(
            ProblemKind.DELETED,
            line,
            1,
            f"records 1 to {record.seq - 1} are missing: the start of the log was removed",
        )
    return Problem(ProblemKind.EDITED, line, 1, "the first record does not start the chain (prev)")


def _chain_resumes_below(
    prev: AuditRecord, expected: int, record: AuditRecord, line: int, ahead: list[_Numbered]
) -> Problem | None:
    """Whether the chain goes on from ``prev`` a little further down: then ``record`` is
    either early (reordered) or not part of the chain at all (inserted)."""
    resumes = next(((n, r) for n, r in ahead if r.prev == prev.hash and r.seq == expected), None)
    if resumes is None:
        return None
    later = {r.hash for n, r in ahead if n >= resumes[0]}
    if record.prev in later:
        return Problem(
            ProblemKind.REORDERED,
            line,
            record.seq,
            f"record {record.seq} comes before record {expected} (which is on line {resumes[0]})",
        )
    return Problem(
        ProblemKind.INSERTED,
        line,
        None,
        f"this line is not part of the chain, which goes on from record {prev.seq} "
        f"at line {resumes[0]}",
    )


def _numbers_jump_forward(
    expected: int, record: AuditRecord, line: int, ahead: list[_Numbered]
) -> Problem:
    """Record numbers skip ahead: the missing ones come later (reordered) or not at all."""
    missing = range(expected, record.seq)
    if any(r.seq in missing for _, r in ahead):
        return Problem(
            ProblemKind.REORDERED,
            line,
            record.seq,
            f"record {record.seq} comes before record {expected}",
        )
    last_missing = record.seq - 1
    span = (
        f"record {expected} is"
        if last_missing == expected
        else (f"records {expected} to {last_missing} are")
    )
    return Problem(ProblemKind.DELETED, line, expected, f"{span} missing before this line")


def _link_broken(
    prev: AuditRecord,
    prev_line: int,
    record: AuditRecord,
    line: int,
    following: AuditRecord | None,
) -> Problem:
    """The right record number, but not linked to ``prev``: one of the two was edited."""
    if following is None or following.prev == record.hash:
        # This record and the ones after it agree with each other, not with prev:
        # prev was edited and its hash recomputed.
        return Problem(
            ProblemKind.EDITED,
            prev_line,
            prev.seq,
            f"record {prev.seq} was changed: record {record.seq} holds another hash for it",
        )
    return Problem(
        ProblemKind.EDITED,
        line,
        record.seq,
        f"record {record.seq} was changed: it does not link to the record before it",
    )


def _numbers_go_back(
    prev: AuditRecord,
    record: AuditRecord,
    line: int,
    behind: deque[_Numbered],
    following: AuditRecord | None,
) -> Problem:
    """The record number went backwards: lines were inserted before it, or it repeats or
    forks an earlier record, or it is out of order."""
    origin = next(((n, r) for n, r in reversed(behind) if r.hash == record.prev), None)
    if origin is not None and origin[1].seq + 1 == record.seq:
        skipped = {r.hash for n, r in behind if n > origin[0]}
        if following is not None and following.prev in skipped:
            return Problem(
                ProblemKind.INSERTED, line, None, "this line repeats or forks an earlier record"
            )
        return Problem(
            ProblemKind.INSERTED,
            origin[0] + 1,
            None,
            f"lines {origin[0] + 1} to {line - 1} are not part of the chain: record "
            f"{record.seq} links back to record {origin[1].seq}",
        )
    return Problem(
        ProblemKind.REORDERED,
        line,
        record.seq,
        f"record {record.seq} comes after record {prev.seq}",
    )


class _Walk:
    """The walk down the log from its first line: where it stands (the last record that
    verified, and up to :data:`WINDOW` before it) and what it has counted."""

    def __init__(
        self, public_key: VerifyKey, kid: str, head: AuditRecord | None, head_name: str
    ) -> None:
        self.public_key = public_key
        self.kid = kid
        self.head = head
        self.head_name = head_name
        self.prev: AuditRecord | None = None
        self.prev_line = 0
        self.behind: deque[_Numbered] = deque(maxlen=WINDOW)
        self.checkpoints = 0
        self.signed_seq: int | None = None

    def run(self, lines: _Lines) -> Problem | None:
        """Walk to the end of ``lines``, or to the first problem, which it returns."""
        while (item := lines.next()) is not None:
            line, raw = item
            problem = self._step(line, raw, lines)
            if problem is not None:
                return problem
        return None

    def _step(self, line: int, raw: bytes, lines: _Lines) -> Problem | None:
        """Check one line; when it continues the chain, move on to it."""
        try:
            record = AuditRecord.from_line(raw)
        except RecordInvalid as exc:
            return self._unreadable(line, raw, exc, lines)
        if not raw.endswith(b"\n"):
            return Problem(
                ProblemKind.TRUNCATED, line, record.seq, "the last line lacks its newline"
            )
        prev = self.prev
        expected = (prev.seq + 1, prev.hash) if prev is not None else (1, GENESIS)
        if (record.seq, record.prev) != expected:
            ahead = [
                (n, r) for n, raw_ahead in lines.peek(WINDOW)
                if (r := _parse_quietly(raw_ahead)) is not None
            ]  # fmt: skip
            return _classify(prev, self.prev_line, record, line, self.behind, ahead)
        if record.is_checkpoint:
            why = _checkpoint_problem(record, self.public_key, self.kid)
            if why is not None:
                return Problem(ProblemKind.BAD_SIGNATURE, line, record.seq, why)
            self.checkpoints += 1
            self.signed_seq = record.seq - 1
        head = self.head
        if head is not None and record.seq == head.seq and record.hash != head.hash:
            return Problem(
                ProblemKind.HEAD_MISMATCH,
                line,
                record.seq,
                f"record {record.seq} is not the checkpoint {self.head_name} holds: "
                "the log was replaced or rewritten",
            )
        self.prev, self.prev_line = record, line
        self.behind.append((line, record))
        return None

    def _unreadable(self, line: int, raw: bytes, exc: RecordInvalid, lines: _Lines) -> Problem:
        """The problem of a line that is not a record: a partial last line, or a line
        edited or malformed."""
        if not raw.endswith(b"\n") and not lines.peek(1):
            return Problem(ProblemKind.TRUNCATED, line, None, "the last line is a partial record")
        # The line cannot be read as a record, so it names no record number; the one
        # that belongs on it is the next of the chain.
        kind = ProblemKind.EDITED if exc.edited else ProblemKind.MALFORMED
        expected_seq = self.prev.seq + 1 if self.prev is not None else 1
        return Problem(kind, line, expected_seq, f"{exc} (record {expected_seq} belongs here)")


def verify_log(
    path: Path,
    public_key_path: Path,
    *,
    head_path: Path | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Verify the log at ``path`` with the Ed25519 public key (PEM) at ``public_key_path``.

    ``head_path`` defaults to ``audit.head`` beside the log; ``on_bytes`` is called with
    the size of each line as it is read (a progress bar's feed). Returns a
    :class:`VerifyResult` whose ``problem`` is the first problem found (``None`` when the
    log verifies). Raises ``OSError`` if the log or key cannot be read and ``ValueError``
    if the key is not an Ed25519 public key.
    """
    return verify_with_key(
        Path(path), load_public_key(Path(public_key_path)), head_path=head_path, on_bytes=on_bytes
    )


def verify_with_key(
    path: Path,
    public_key: VerifyKey,
    *,
    head_path: Path | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> VerifyResult:
    """:func:`verify_log` with the public key already loaded."""
    path = Path(path)
    kid = key_id(public_key)
    head_file = Path(head_path) if head_path is not None else path.with_name(HEAD_FILE)
    head, head_problem = _read_head(head_file, public_key, kid)

    walk = _Walk(public_key, kid, head, head_file.name)
    with open(path, "rb") as fh:
        problem = walk.run(_Lines(fh, on_bytes))

    last_seq = walk.prev.seq if walk.prev is not None else 0
    if problem is None:
        problem = head_problem
    if problem is None:
        problem = _end_problem(walk, last_seq, head, head_file)
    return VerifyResult(
        path=path,
        records=walk.prev_line,
        last_seq=last_seq,
        last_hash=walk.prev.hash if walk.prev is not None else GENESIS,
        checkpoints=walk.checkpoints,
        signed_seq=walk.signed_seq,
        head_seq=head.seq if head is not None else None,
        problem=problem,
    )


def _end_problem(
    walk: _Walk, last_seq: int, head: AuditRecord | None, head_file: Path
) -> Problem | None:
    """What is wrong with where a log that verified line by line ends: before the signed
    head (cut off), or with checkpoints but no ``audit.head`` to tell a cut-off log by."""
    if head is not None and last_seq < head.seq:
        return Problem(
            ProblemKind.TRUNCATED,
            walk.prev_line + 1,
            last_seq + 1,
            f"the log ends at record {last_seq}, but {head_file.name} holds signed "
            f"checkpoint {head.seq}: records were cut off",
        )
    if head is None and walk.checkpoints and not head_file.exists():
        return Problem(
            ProblemKind.HEAD_MISSING,
            None,
            None,
            f"the log holds checkpoints but {head_file.name} is missing, so a cut-off "
            "log could not be told from a whole one",
        )
    return None


def export(path: Path) -> Iterator[dict[str, Any]]:
    """The records of the log at ``path`` as dicts, in file order, without verifying.

    Raises :class:`AuditCorrupt` at a line that is not a JSON object, or that nests
    deeper than a record can. Verify the log first (:func:`verify_log`) when the export
    is meant as evidence.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if json_nesting_exceeds(raw, RECORD_DEPTH):
                raise AuditCorrupt(
                    f"line {number} of {path} is not a record: nested deeper than a record can be"
                )
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise AuditCorrupt(f"line {number} of {path} is not JSON") from exc
            if not isinstance(value, dict):
                raise AuditCorrupt(f"line {number} of {path} is not a JSON object")
            yield value
