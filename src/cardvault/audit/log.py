"""The audit log writer, :class:`AuditLog`: an append-only, hash-chained, signed
JSON-lines file, written by group commit. The file primitives it is built on (append and
fsync, cut back, the locked open and the check of the tail) are in
:mod:`cardvault.audit.logfile`; the record in :mod:`cardvault.audit.record`.

Files, all in the service's own state directory:

``audit.jsonl``  the log (mode 0600), one record per line (see :mod:`.record`).
``audit.key``    the Ed25519 signing key (mode 0600), made on first use.
``audit.pub``    its public key (PEM), to be published and kept with shipped logs.
``audit.head``   a copy of the newest checkpoint record, replaced atomically after each
                 checkpoint, so that a log cut short after its last checkpoint is noticed.

Durability, and why it is what "fail closed" rests on: :meth:`AuditLog.append` returns
only after the record's line is written and ``fsync``-ed. A service performs a sensitive
operation only after the append returned; when the append raises
:class:`AuditUnavailable`, the service refuses the operation. So nothing happens that
the log does not hold.

Group commit: everything happens on the event loop, in the order appends are made, so
the chain needs no lock. An append chains its record and keeps its line in memory; the
first append after a flush schedules the next one, to run two loop iterations later
(``call_soon`` twice), and every append awaits it. The flush writes the lines of every
record made by then with one ``write`` and makes them durable with one ``fsync``, then
settles every caller. Concurrent requests thus share a write and an fsync, and a lone
request waits for no one. :attr:`AuditLog.fsyncs` counts the fsyncs.

Why the ``fsync`` blocks the loop instead of running on a thread: a thread that must
take the interpreter back from a busy event loop after every ``fsync`` costs the loop
more CPU per request (switches, forced hand-overs of the GIL) than the ``fsync`` wait it
saves, measured at about 240 µs against 80 µs per tokenization on this project's
benchmark machine. It is what Redis does with ``appendfsync always``: one write and one
fsync per event-loop iteration, before any reply. The price is that a disk whose fsync
stalls stalls the service with it, which a service that must not answer before its
records are durable cannot avoid anyway.

Failure: when the flush's write or fsync fails, the file is cut back to its last
durable length and every record of the flush fails with :class:`AuditUnavailable`; the
chain continues from the last durable record. If even that cut fails, the log is *broken*:
every later append fails until the service is restarted, and the restart refuses to
continue a damaged tail (:class:`AuditCorrupt`).

Checkpoints: after every ``checkpoint_every`` records, after ``checkpoint_interval``
seconds with unsigned records, and on :meth:`AuditLog.close`, the log appends an
``audit.checkpoint`` record whose detail holds ``head`` (the hash of the record before
it), ``seq`` (that record's number), ``signature`` and ``key_id`` (see
:mod:`.signing`). The checkpoint is itself part of the chain.

Re-opening: the log is checked as :mod:`cardvault.audit.opening` describes (all its bytes
against ``audit.tail``, the service's MAC-ed mark of where it ends, and ``audit.head``
against the log), and continued only if it is exactly the chain this service wrote;
otherwise :class:`AuditCorrupt` names the problem and points to ``cardvault audit
repair``. Before each write the mark is replaced (:mod:`cardvault.audit.tailfile`), so
that records written after the last checkpoint and before a crash are recognised as the
service's own and signed by its next checkpoint, and anyone else's are refused. The file
is locked (``flock``) while open, so two processes cannot write one log.

Health: :attr:`AuditLog.broken` (a failure the log cannot recover from) and
:attr:`AuditLog.failing_since` (the last write failed, and none has succeeded since) are
what a service watches to stop and let its supervisor restart it
(:func:`cardvault.audit.recorder.watch_audit_log`).

A caller cancelled while it awaits the flush cannot tell whether its record is durable:
it was made, and the flush still makes it durable unless the write or fsync fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final

import structlog

from cardvault.audit.errors import AuditUnavailable
from cardvault.audit.logfile import HEAD_FILE, LOG_FILE, TAIL_FILE, AppendFile
from cardvault.audit.opening import check_log
from cardvault.audit.record import (
    CHECKPOINT_ACTION,
    AuditRecord,
    DetailValue,
    format_time,
    now_text,
)
from cardvault.audit.signing import (
    ensure_public_key,
    key_id,
    load_or_create_signing_key,
    sign_checkpoint,
)
from cardvault.audit.tailfile import LogEnd, TailFile, TailMark, encode_mark, mark_key
from cardvault.audit.text import check_entry
from cardvault.crypto import SigningKey
from cardvault.files import write_private

__all__ = [
    "CHECKPOINT_EVERY",
    "CHECKPOINT_INTERVAL",
    "HEAD_FILE",
    "LOG_FILE",
    "TAIL_FILE",
    "AuditLog",
    "checkpoint_record",
]

#: Records between two checkpoints, at most.
CHECKPOINT_EVERY: Final = 1000
#: Seconds an unsigned record waits, at most, for a checkpoint. This bounds what a crash
#: can leave unsigned: records after the last checkpoint can be cut off undetected.
CHECKPOINT_INTERVAL: Final = 60.0
#: The actor of the checkpoint records the log writes itself.
CHECKPOINT_ACTOR: Final = "audit"

_EMPTY: Mapping[str, DetailValue] = MappingProxyType({})
_log = structlog.get_logger("cardvault.audit")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_Waiter = tuple["asyncio.Future[AuditRecord]", AuditRecord]


def _fail(waiters: list[_Waiter], message: str, cause: BaseException | None) -> None:
    for future, _ in waiters:
        if future.done():  # the caller was cancelled
            continue
        # One exception per caller: a shared one would collect every traceback.
        error = AuditUnavailable(message)
        error.__cause__ = cause
        future.set_exception(error)


class AuditLog:
    """The audit log of one service, kept in ``directory`` (its state directory).

    Opening reads the tail and may raise :class:`AuditCorrupt` (the tail or
    ``audit.head`` is not a valid continuation) or :class:`AuditUnavailable` (the files
    cannot be opened or another process holds the log). Use ``await AuditLog.open(...)``
    from async code to do this off the event loop, and close with ``await log.close()``
    (or ``async with``), which writes a final checkpoint.

    ``clock`` returns the time written in records (an aware ``datetime``); tests inject it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        if checkpoint_every < 1 or not checkpoint_interval > 0:
            raise ValueError("checkpoint_every and checkpoint_interval must be > 0")
        self.directory = Path(directory)
        self.path = self.directory / LOG_FILE
        self.head_path = self.directory / HEAD_FILE
        self.tail_path = self.directory / TAIL_FILE
        self._every = checkpoint_every
        self._interval = checkpoint_interval
        self._clock = clock
        # The default clock's text is made without a datetime (see now_text).
        self._now: Callable[[], str] = (
            now_text if clock is _utcnow else lambda: format_time(self._clock())
        )
        self._closed = False
        self._broken: BaseException | None = None
        # Since when writes fail (monotonic; None while the last one succeeded), and why.
        self._failing_since: float | None = None
        self._failure: str | None = None
        # Written since the last flush: the callers waiting, how many records, and the
        # newest checkpoint's line (for audit.head).
        self._waiters: list[_Waiter] = []
        self._lines: list[bytes] = []
        self._unsynced = 0
        self._head: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._fsyncs = 0
        self._records = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._key = load_or_create_signing_key(self.directory)
            self.public_key_path = ensure_public_key(self.directory, self._key)
        except OSError as exc:
            raise AuditUnavailable("the audit signing key cannot be read or created") from exc
        self.key_id = key_id(self._key.public_key)
        self._mark_key = mark_key(self._key)
        self._file = AppendFile.open(self.path)
        try:
            opening = check_log(
                self.path, self.head_path, self.tail_path, self._key.public_key, self._mark_key
            )
            try:
                self._tail = TailFile.open(self.tail_path)
            except OSError as exc:
                raise AuditUnavailable(f"{self.tail_path} cannot be opened") from exc
        except BaseException:
            self._file.close()
            raise
        end = opening.end
        if opening.new_mark:
            try:
                self._tail.write(encode_mark(TailMark(end, end), self._mark_key))
            except OSError as exc:
                self._tail.close()
                self._file.close()
                raise AuditUnavailable(f"{self.tail_path} cannot be written") from exc
        #: SHA-256 of the durable bytes of the log, and the end they make.
        self._hasher = opening.hasher
        self._durable_end = end
        self._seq, self._prev, self._size = end.seq, end.hash, end.size
        self._checkpoint = (end.checkpoint_seq, end.checkpoint_hash)
        # The records after the newest checkpoint, which the timer signs within
        # checkpoint_interval of the next write (or close signs).
        self._since_checkpoint = end.unsigned
        self._last_checkpoint = time.monotonic()
        # (seq, prev, size, since, checkpoint) of the last durable record; the fields
        # above are the last written one's.
        self._durable = (
            self._seq, self._prev, self._size, self._since_checkpoint, self._checkpoint,
        )  # fmt: skip

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> AuditLog:
        """Open (see the class docstring) without blocking the event loop."""
        return await asyncio.to_thread(
            cls,
            directory,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, seq={self.seq})"

    # -- public API ----------------------------------------------------------------------

    @property
    def fsyncs(self) -> int:
        """Successful fsyncs so far, for metrics and tests."""
        return self._fsyncs

    @property
    def records_written(self) -> int:
        """Records made durable since opening, checkpoints included."""
        return self._records

    @property
    def seq(self) -> int:
        """The number of the last durable record (0 for an empty log)."""
        return self._durable[0]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> BaseException | None:
        """Why the log can no longer be written until the service restarts (the file
        could not be cut back after a failed write, or ``audit.head`` not replaced), or
        None."""
        return self._broken

    @property
    def failing_since(self) -> float | None:
        """Since when (``time.monotonic()``) writes fail: set by a failed write, cleared
        by the next one that succeeds. None while the log writes."""
        return self._failing_since

    @property
    def failure(self) -> str | None:
        """The last failure (the OS error), while :attr:`writable` is False."""
        return self._failure if not self.writable else None

    @property
    def writable(self) -> bool:
        """Whether the last write succeeded and the log is open and not broken."""
        return not self._closed and self._broken is None and self._failing_since is None

    async def append(
        self,
        action: str,
        *,
        actor: str,
        origin: str | None,
        object_id: str | None,
        result: str,
        request_id: str | None,
        detail: Mapping[str, DetailValue] = _EMPTY,
    ) -> AuditRecord:
        """Append one record and return it once it is durable.

        ``action``: what was done, a dotted lower-case name (``keyservice.datakey.unwrap``).
        ``actor``: who (an API key id, or a client certificate's identity).
        ``origin``: the peer address. ``object_id``: what it was done to.
        ``result``: ``ok``, ``denied``, ``error`` or an error code. ``request_id``: the
        request's id. ``detail``: a few more facts (str, int, bool or None values).

        Raises :class:`ValueError` (before anything is written) when a value holds card
        data or key material or is malformed (see :mod:`.record`), and
        :class:`AuditUnavailable` when the record could not be made durable: the caller
        must then refuse the operation.
        """
        return await self.append_soon(
            action,
            actor=actor,
            origin=origin,
            object_id=object_id,
            result=result,
            request_id=request_id,
            detail=detail,
        )

    def append_soon(
        self,
        action: str,
        *,
        actor: str,
        origin: str | None,
        object_id: str | None,
        result: str,
        request_id: str | None,
        detail: Mapping[str, DetailValue] = _EMPTY,
    ) -> asyncio.Future[AuditRecord]:
        """:meth:`append` without waiting: the record is made and chained now, in the
        next flush, and the future answers it once it is durable (or fails with
        :class:`AuditUnavailable`). Raises at once what :meth:`append` raises before
        anything is written. For an operation that may be queued in the same flush pass
        as long as it happens only once the record is durable (a forward's pending row:
        ``VaultStore.insert_forwarding_request``'s ``after``)."""
        check_entry(
            action=action,
            actor=actor,
            origin=origin,
            object_id=object_id,
            result=result,
            request_id=request_id,
            detail=detail,
        )
        loop = asyncio.get_running_loop()
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        if self._broken is not None:
            raise AuditUnavailable("the audit log failed and cannot be written") from (self._broken)
        record = AuditRecord.seal(
            seq=self._seq + 1,
            time=self._now(),
            actor=actor,
            origin=origin,
            action=action,
            object_id=object_id,
            result=result,
            request_id=request_id,
            detail=detail,
            prev=self._prev,
        )
        future: asyncio.Future[AuditRecord] = loop.create_future()
        made = [record]
        if self._since_checkpoint + 1 >= self._every:
            made.append(self._checkpoint_record(record.seq, record.hash))
        self._write(loop, made, (future, record))
        return future

    async def close(self) -> None:
        """Make what was written durable, sign the head (a final checkpoint), and close.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._broken is None and self._since_checkpoint:
            loop = asyncio.get_running_loop()
            checkpoint = self._checkpoint_record(self._seq, self._prev)
            future: asyncio.Future[AuditRecord] = loop.create_future()
            try:
                self._write(loop, [checkpoint], (future, checkpoint))
                await future
            except AuditUnavailable as exc:
                _log.error("audit_close_checkpoint_failed", path=str(self.path), error=str(exc))
        elif self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        self._file.close()
        self._tail.close()

    async def __aenter__(self) -> AuditLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writing (on the event loop) ----------------------------------------------------

    def _write(
        self,
        loop: asyncio.AbstractEventLoop,
        records: list[AuditRecord],
        waiter: _Waiter | None,
    ) -> None:
        """Add ``records`` (already chained on the last one made) to the next flush,
        which writes them and makes them durable; ``waiter`` is settled after it."""
        size = 0
        for record in records:
            line = record.line()
            self._lines.append(line)
            size += len(line)
        since = self._since_checkpoint
        head = None
        for record in records:
            if record.is_checkpoint:
                since, head = 0, record.line()
                self._checkpoint = (record.seq, record.hash)
                self._last_checkpoint = time.monotonic()
            else:
                since += 1
        last = records[-1]
        self._seq, self._prev, self._since_checkpoint = last.seq, last.hash, since
        self._size += size
        self._unsynced += len(records)
        if head is not None:
            self._head = head
        if waiter is not None:
            self._waiters.append(waiter)
        if self._flush_handle is None or self._flush_loop is not loop:
            # (A flush scheduled on another event loop, one that has since stopped,
            # would never run: each loop gets its own.)
            self._flush_handle = loop.call_soon(self._flush_next, loop)
            self._flush_loop = loop
        if since and (self._timer is None or self._timer_loop is not loop) and not self._closed:
            self._arm_timer(loop)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sign the unsigned records ``checkpoint_interval`` after the last checkpoint."""
        self._timer_loop = loop
        delay = max(0.0, self._last_checkpoint + self._interval - time.monotonic())
        self._timer = loop.call_later(delay, self._timed_checkpoint, loop)

    def _timed_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sign what has waited ``checkpoint_interval`` unsigned (runs on the loop)."""
        self._timer = None
        if self._closed or self._broken is not None or not self._since_checkpoint:
            return
        self._write(loop, [self._checkpoint_record(self._seq, self._prev)], None)

    def _cut(self, size: int, cause: OSError) -> None:
        """Cut the file back to ``size``, or mark the log broken."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._failure = str(cause)
        try:
            self._file.truncate(size)
        except OSError as exc:
            self._broken = exc
            self._failure = f"{cause}; and the log could not be cut back: {exc}"
            _log.error("audit_log_broken", path=str(self.path), error=str(exc))
        else:
            _log.error("audit_write_failed", path=str(self.path), error=str(cause))

    def _flush_next(self, loop: asyncio.AbstractEventLoop) -> None:
        # The flush runs one loop iteration after the first write rather than in the
        # next: the requests whose callbacks were already queued then join it. On the
        # tokenization benchmark this made batches larger and cut the vault's CPU per
        # request by about 6%; a lone write waits one idle iteration more (microseconds).
        self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything made since the last flush and make it durable, then settle
        its callers (runs on the loop, see the module's docstring)."""
        self._flush_handle = None
        waiters, records, head = self._waiters, self._unsynced, self._head
        lines = self._lines
        self._waiters, self._unsynced, self._head, self._lines = [], 0, None, []
        if not records:
            return
        data = b"".join(lines)
        try:
            # The mark first: a crash at any point leaves the log at one of its two ends.
            hasher = self._hasher.copy()
            hasher.update(data)
            end = LogEnd(self._size, hasher.hexdigest(), self._seq, self._prev, *self._checkpoint)
            self._tail.write(encode_mark(TailMark(self._durable_end, end), self._mark_key))
            self._file.write(data)
            self._file.sync()
        except OSError as exc:
            seq, prev, size, since, checkpoint = self._durable
            self._seq, self._prev, self._size = seq, prev, size
            self._since_checkpoint, self._checkpoint = since, checkpoint
            self._cut(size, exc)
            _fail(waiters, "the audit record could not be written", exc)
            if since and self._timer is None and not self._closed and self._broken is None:
                # What was durable before stays unsigned: sign it one interval from now
                # (a failed timed checkpoint ends here too).
                self._last_checkpoint = time.monotonic()
                self._arm_timer(asyncio.get_running_loop())
            return
        self._fsyncs += 1
        self._records += records
        self._hasher, self._durable_end = hasher, end
        self._failing_since = None
        try:
            # Now only this end is the log's: a log cut back to the end before this write
            # (its records acknowledged below) is no longer one the mark allows.
            self._tail.write(encode_mark(TailMark(end, end), self._mark_key))
        except OSError as exc:  # the mark still allows this end: nothing is lost
            _log.warning("audit_mark_write_failed", path=str(self.tail_path), error=str(exc))
        self._durable = (
            self._seq, self._prev, self._size, self._since_checkpoint, self._checkpoint,
        )  # fmt: skip
        if head is not None:
            try:
                write_private(self.head_path, head)
            except OSError as exc:
                # The records are durable, so their callers succeed; but without a
                # current audit.head a cut-off log could pass verification, so refuse
                # every later append (fail closed) until an operator looks.
                self._broken = exc
                self._failing_since = self._failing_since or time.monotonic()
                self._failure = f"{self.head_path} could not be replaced: {exc}"
                _log.error("audit_head_write_failed", path=str(self.head_path), error=str(exc))
        for future, record in waiters:
            if not future.done():  # the caller was cancelled
                future.set_result(record)

    def _checkpoint_record(self, seq: int, head: str) -> AuditRecord:
        return checkpoint_record(self._key, self.key_id, seq, head, self._now())


def checkpoint_record(key: SigningKey, kid: str, seq: int, head: str, time: str) -> AuditRecord:
    """The checkpoint that signs record ``seq`` (whose hash is ``head``), made at ``time``."""
    detail: dict[str, DetailValue] = {
        "head": head,
        "seq": seq,
        "signature": sign_checkpoint(key, head, seq),
        "key_id": kid,
    }
    return AuditRecord.seal(
        seq=seq + 1,
        time=time,
        actor=CHECKPOINT_ACTOR,
        origin=None,
        action=CHECKPOINT_ACTION,
        object_id=None,
        result="ok",
        request_id=None,
        detail=detail,
        prev=head,
    )
