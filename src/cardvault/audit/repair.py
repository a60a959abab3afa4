"""``cardvault audit repair``: make a log its service refuses to continue continuable
again, and record in the log, signed, what was found and what was done.

A service refuses to continue a log that is not exactly the chain it wrote, or that holds
records it cannot vouch for (:mod:`cardvault.audit.opening`); it never decides by itself
what to keep. Repair is that decision, taken by an operator on the service's host with
the service stopped (it takes the log's lock, and needs ``audit.key``):

1. It keeps the longest first part of the log that verifies as a chain (what ``cardvault
   audit verify`` walks before its first problem) and that is vouched for: signed by a
   checkpoint, or shown by the service's mark (``audit.tail``) to be what the service
   wrote. With ``adopt_unsigned``, the records after that which still verify are kept
   too: the operator vouches for them (records written just before a power cut, or a log
   from before the mark existed that ended in a crash).
2. Every line after the part kept is moved, as it was, to ``audit.cut-<UTC time>.jsonl``
   beside the log (mode 0600): nothing is deleted.
3. An ``audit.repaired`` record is appended, chained on the last record kept, saying what
   was found (the problem's kind, its line, the reason), what was kept (through which
   record, how many unsigned records were adopted), what was cut (lines, bytes, their
   SHA-256 and the file they are in) and what ``audit.head`` and ``audit.tail`` were
   (missing, invalid, naming a record beyond the end or another record); then a
   checkpoint that signs it. ``audit.head`` is that checkpoint, and a new mark is written.

After a repair the log verifies, with the repair record in its signed chain: removing
the record breaks the chain, and a log cut back before it ends before its signed head.

A repair stopped half-way (a crash) leaves a log that start-up still refuses; run it
again: the lines already moved are in the first ``audit.cut-…`` file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cardvault.audit.errors import AuditCorrupt
from cardvault.audit.log import checkpoint_record
from cardvault.audit.logfile import HEAD_FILE, TAIL_FILE, AppendFile, checkpoint_ok
from cardvault.audit.opening import check_log, mark_end, scan_log
from cardvault.audit.record import GENESIS, AuditRecord, DetailValue, RecordInvalid, now_text
from cardvault.audit.signing import KEY_FILE, key_id
from cardvault.audit.tailfile import (
    LogEnd,
    MarkInvalid,
    TailMark,
    encode_mark,
    mark_key,
    read_mark,
)
from cardvault.audit.text import check_entry, untrusted_text
from cardvault.audit.verify import Problem, verify_with_key
from cardvault.crypto import SigningKey
from cardvault.files import write_private

__all__ = ["REPAIR_ACTION", "Repair", "RepairPlan"]

#: The action of the record a repair writes.
REPAIR_ACTION: Final = "audit.repaired"
_CHECKPOINT_TEXT: Final = b'"action":"audit.checkpoint"'


@dataclass(frozen=True)
class RepairPlan:
    """What a repair would do to one log (see the module docstring)."""

    path: Path
    #: Why the service refuses to continue the log (None: it would continue it as it is).
    refused: str | None
    #: The refusal's kind (``edited``, ``unvouched``, ``head_missing`` ...) and reason.
    kind: str | None
    reason: str | None
    #: The first problem ``verify`` finds, if any.
    problem: Problem | None
    #: Lines in the log now, and of them the ones kept (the first ``keep_lines``).
    lines: int
    keep_lines: int
    keep_bytes: int
    #: The last record kept (0 and GENESIS: none).
    keep_seq: int
    keep_hash: str
    cut_lines: int
    cut_bytes: int
    #: Records after the vouched part that verify, and how many of them are kept.
    unvouched: int
    adopted: int
    #: What ``audit.head`` was: ok, missing, invalid, beyond_end (it names a record after
    #: the last one kept), mismatch (the log holds another record at its number).
    head: str
    #: What ``audit.tail`` was: ok, missing, invalid, differs (not this log's end).
    mark: str

    @property
    def needed(self) -> bool:
        return self.refused is not None


class Repair:
    """A repair of the log at ``path``: :meth:`plan`, then :meth:`apply`. Holds the log's
    lock from opening to :meth:`close` (so the service must be stopped).

    Raises ``FileNotFoundError`` when there is no log, :class:`AuditCorrupt` when there
    is no usable signing key, and :class:`~cardvault.audit.errors.AuditUnavailable` when
    the log is open elsewhere."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.directory = self.path.parent
        self.head_path = self.directory / HEAD_FILE
        self.tail_path = self.directory / TAIL_FILE
        if not self.path.is_file():
            raise FileNotFoundError(2, "no audit log", str(self.path))
        key_file = self.directory / KEY_FILE
        try:
            self._key = SigningKey.from_pem(key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise AuditCorrupt(
                f"{key_file} cannot be read as the log's signing key ({exc}): a repair signs "
                "what it does with the service's key"
            ) from None
        self._mark_key = mark_key(self._key)
        self._file = AppendFile.open(self.path)

    def __enter__(self) -> Repair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # -- the plan --------------------------------------------------------------------

    def plan(self, *, adopt_unsigned: bool = False) -> RepairPlan:
        """What :meth:`apply` would do; nothing is written."""
        public_key = self._key.public_key
        refused: AuditCorrupt | None = None
        try:
            check_log(self.path, self.head_path, self.tail_path, public_key, self._mark_key)
        except AuditCorrupt as exc:
            refused = exc
        result = verify_with_key(self.path, public_key, head_path=self.head_path)
        problem = result.problem
        keep = result.records
        if problem is not None and problem.line is not None:
            keep = min(keep, problem.line - 1)
        offsets, last_checkpoint = self._lines(keep)
        vouched, mark = self._vouched(offsets, keep, last_checkpoint)
        unvouched = max(0, keep - vouched)
        adopted = unvouched if adopt_unsigned else 0
        if not adopt_unsigned:
            keep = min(keep, vouched)
        keep_bytes = offsets[keep - 1] if keep else 0
        last = self._record_at(offsets, keep)
        keep_seq, keep_hash = (last.seq, last.hash) if last is not None else (0, GENESIS)
        size = offsets[-1] if offsets else 0
        return RepairPlan(
            path=self.path,
            refused=str(refused) if refused is not None else None,
            kind=refused.kind if refused is not None else None,
            reason=refused.reason if refused is not None else None,
            problem=problem,
            lines=len(offsets),
            keep_lines=keep,
            keep_bytes=keep_bytes,
            keep_seq=keep_seq,
            keep_hash=keep_hash,
            cut_lines=len(offsets) - keep,
            cut_bytes=size - keep_bytes,
            unvouched=unvouched,
            adopted=adopted,
            head=self._head_state(offsets, keep, keep_seq),
            mark=mark,
        )

    def _lines(self, keep: int) -> tuple[list[int], int]:
        """The byte offset at the end of each line, and the last line among the first
        ``keep`` that is a checkpoint (those lines verified, so their text is exact)."""
        offsets: list[int] = []
        last_checkpoint = 0
        end = 0
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                end += len(raw)
                offsets.append(end)
                if number <= keep and _CHECKPOINT_TEXT in raw:
                    last_checkpoint = number
        return offsets, last_checkpoint

    def _vouched(self, offsets: list[int], keep: int, last_checkpoint: int) -> tuple[int, str]:
        """How many of the first ``keep`` lines are vouched for (signed, or the mark's
        end), and what the mark was."""
        try:
            mark = read_mark(self.tail_path, self._mark_key)
        except MarkInvalid:
            return last_checkpoint, "invalid"
        if mark is None:
            return last_checkpoint, "missing"
        scan = scan_log(self.path, (mark.durable.size, mark.writing.size))
        state = "ok" if mark_end(mark, scan) is not None else "differs"
        vouched = last_checkpoint
        ends = {0: 0, **{size: n for n, size in enumerate(offsets[:keep], start=1)}}
        for end in (mark.durable, mark.writing):
            line = ends.get(end.size)
            if line is not None and scan.digests.get(end.size) == end.sha256:
                vouched = max(vouched, line)
        return vouched, state

    def _record_at(self, offsets: list[int], line: int) -> AuditRecord | None:
        if line == 0:
            return None
        start = offsets[line - 2] if line > 1 else 0
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return AuditRecord.from_line(fh.read(offsets[line - 1] - start))

    def _head_state(self, offsets: list[int], keep: int, keep_seq: int) -> str:
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return "missing"
        try:
            head = AuditRecord.from_line(raw)
        except RecordInvalid:
            return "invalid"
        if not head.is_checkpoint or not checkpoint_ok(head, self._key.public_key):
            return "invalid"
        if head.seq > keep_seq:
            return "beyond_end"
        # In the part kept (a verified chain from record 1), line n holds record n.
        at = self._record_at(offsets, head.seq) if head.seq <= keep else None
        return "ok" if at is not None and at.hash == head.hash else "mismatch"

    # -- doing it --------------------------------------------------------------------

    def apply(self, plan: RepairPlan, *, actor: str) -> AuditRecord:
        """Do what ``plan`` says (it must be this log's, made under this lock) and return
        the ``audit.repaired`` record. ``actor`` is who asked (the operator)."""
        if not plan.needed or plan.path != self.path:
            raise ValueError("this plan is not a repair of this log")
        with open(self.path, "rb") as fh:
            fh.seek(plan.keep_bytes)
            cut = fh.read()
        if len(cut) != plan.cut_bytes:
            raise AuditCorrupt(f"{self.path} changed since the plan was made; plan again")
        cut_file = None
        if cut:
            cut_file = self._cut_file()
            write_private(cut_file, cut)
        self._file.truncate(plan.keep_bytes)
        detail: dict[str, DetailValue] = {
            "found": plan.kind or "unknown",
            "found_line": plan.problem.line if plan.problem is not None else None,
            "reason": untrusted_text(plan.reason or plan.refused or "", limit=300),
            "kept_through": plan.keep_seq,
            "unsigned_adopted": plan.adopted,
            "cut_lines": plan.cut_lines,
            "cut_bytes": plan.cut_bytes,
            "cut_sha256": hashlib.sha256(cut).hexdigest() if cut else None,
            "cut_file": untrusted_text(cut_file.name) if cut_file is not None else None,
            "head_was": plan.head,
            "mark_was": plan.mark,
        }
        check_entry(
            action=REPAIR_ACTION,
            actor=actor,
            origin="local",
            object_id=None,
            result="ok",
            request_id=None,
            detail=detail,
        )
        record = AuditRecord.seal(
            seq=plan.keep_seq + 1,
            time=now_text(),
            actor=actor,
            origin="local",
            action=REPAIR_ACTION,
            object_id=None,
            result="ok",
            request_id=None,
            detail=detail,
            prev=plan.keep_hash,
        )
        checkpoint = checkpoint_record(
            self._key, key_id(self._key.public_key), record.seq, record.hash, now_text()
        )
        self._file.write(record.line() + checkpoint.line())
        self._file.sync()
        write_private(self.head_path, checkpoint.line())
        scan = scan_log(self.path)
        end = LogEnd(
            scan.size,
            scan.hasher.hexdigest(),
            checkpoint.seq,
            checkpoint.hash,
            checkpoint.seq,
            checkpoint.hash,
        )
        write_private(self.tail_path, encode_mark(TailMark(end, end), self._mark_key))
        return record

    def _cut_file(self) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        candidate = self.directory / f"audit.cut-{stamp}.jsonl"
        n = 1
        while candidate.exists():
            n += 1
            candidate = self.directory / f"audit.cut-{stamp}-{n}.jsonl"
        return candidate
