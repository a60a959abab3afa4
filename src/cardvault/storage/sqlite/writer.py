"""The SQLite database under every SQLite store: a group-commit writer on the event loop,
readers on threads. It knows no table: a store subclasses :class:`SQLiteDatabase` and
writes its queries as functions of a connection, handed to :meth:`~SQLiteDatabase._write`
(durable when it returns), :meth:`~SQLiteDatabase._lookup` or
:meth:`~SQLiteDatabase._read`. Opening and durability are in
:mod:`~cardvault.storage.sqlite.connection`; checkpoints and scrubbing in
:mod:`~cardvault.storage.sqlite.wal`.

Concurrency:

* **Group commit on the event loop.** Write methods put an operation on a list and
  await a future; the first operation after a flush schedules the next one, to run two
  loop iterations later (``call_soon`` twice, so that requests already under way
  join it). The flush runs every operation queued by then (up to ``max_batch`` per
  transaction) in one ``BEGIN IMMEDIATE`` transaction, each failing alone (a duplicate
  id, say: SQLite undoes the failed statement, and an operation of several statements
  runs in its own ``SAVEPOINT``), commits once (``synchronous=FULL``: the WAL is
  fsynced inside ``COMMIT``) and only then settles the futures. Plain inserts into one
  table that follow each other are merged into one multi-row ``INSERT``; a batch of
  nothing else is committed as that one statement. An answer therefore still means
  "durable", but 32 concurrent writers share one fsync instead of queueing for 32 of
  them; batches grow with load and a lone write waits for no one.
  ``group_commit=False`` commits every operation on its own (for comparison).
* **Why on the loop and not on a writer thread** (the first design): a thread that
  must take the interpreter back from a busy event loop after every statement and
  fsync cost the loop more CPU (switches, forced hand-overs of the GIL) than the waits
  it saved, about 0.5 ms per tokenization on this project's benchmark machine, and
  stretched each commit to several milliseconds of GIL waits. Redis does the same with
  ``appendfsync always``. The price is that the loop stops for the length of a commit.
  The writing connection never waits inside SQLite (``busy_timeout=0``): when another
  process holds the write lock, the flush tries again ``BUSY_RETRY_S`` later, for up to
  ``BUSY_TIMEOUT_S``, then fails that batch.
* Lookups by primary key run on the event loop through the writing connection, between
  flushes: they take microseconds, and a hand-off to a thread and back costs more.
  Other reads (lists) run on a small pool of threads, each with its own connection (WAL
  readers do not block the writer or each other). Both see every committed write.

A caller that is cancelled while its write is queued cannot tell whether it happened:
the operation may still be committed.

**An unavailable database is one exception.** Whatever SQLite or the file system says
that means "cannot take this now" (the disk full, ``max_page_count`` reached, an I/O
error, the lock held by another process past ``BUSY_TIMEOUT_S``, a file that cannot be
opened or written) reaches the caller as :class:`~cardvault.storage.StoreUnavailable`
(:func:`~cardvault.storage.sqlite.connection.unavailable`), from a write, a lookup or a
read alike, with SQLite's error as its cause; never as a ``sqlite3`` exception. A
writing connection that could not be opened is tried again on a later call (at most
every ``REOPEN_AFTER_S``), so a store whose disk was full works again once there is
space, without a restart.

The store belongs to the event loop that writes to it; a write from another loop is
settled on that loop, but the flush runs on the loop that scheduled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog

from cardvault.files import ensure_private_file
from cardvault.storage._shared import (
    CANNOT_OPEN,
    StoreUnavailable,
    column_list,
    copy_error,
    settle_on_their_loops,
    store_unavailable,
)
from cardvault.storage.base import UnstorableValue
from cardvault.storage.migrations import Schema
from cardvault.storage.sqlite.connection import (
    BINDING_ERRORS,
    BUSY_TIMEOUT_S,
    apply_migrations,
    connect,
    translated,
    unavailable,
)
from cardvault.storage.sqlite.wal import WalCheckpoints

__all__ = ["BUSY_RETRY_S", "MAX_BATCH", "READERS", "REOPEN_AFTER_S", "Insert", "SQLiteDatabase"]

T = TypeVar("T")

#: The most operations one transaction carries. Larger batches spread one fsync over
#: more writes but stop the loop longer; at ~60k rows/s a full batch takes under 10 ms.
MAX_BATCH = 512

#: How soon the writer tries again when another process holds the write lock.
BUSY_RETRY_S = 0.002

#: Read connections (threads).
READERS = 4

_log = structlog.get_logger("cardvault.storage")

#: After the writing connection failed to open, the soonest it is tried again (each
#: call meanwhile is unavailable at once, without touching the disk).
REOPEN_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Insert:
    """One row for a plain ``INSERT``: the writer may merge consecutive ones for the same
    table into a single multi-row statement (one ``sqlite3_step`` and one statement to
    prepare for all of them instead of one per row)."""

    table: str
    columns: tuple[str, ...]
    params: tuple[Any, ...]
    what: str


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    #: The operation erases data, so the WAL must be scrubbed after it commits.
    erases: bool
    #: The operation runs several writing statements, so it runs inside a savepoint to
    #: fail as a whole. Otherwise its one writing statement must be the last thing in
    #: it that can fail (SQLite undoes a failed statement by itself, and a savepoint per
    #: operation would cost about a tenth of the batch's time).
    compound: bool
    #: Set when the operation is one plain insert (``fn`` then does just that insert).
    insert: Insert | None = None
    #: The operation runs only once this future is settled (:meth:`SQLiteDatabase.
    #: _write`'s ``after``); ``fn`` checks how it settled.
    after: asyncio.Future[Any] | None = None


_Outcome = tuple[_Write, Any, BaseException | None]


class _Busy(Exception):
    """Another connection holds the database's write lock."""

    def __init__(self, error: sqlite3.OperationalError) -> None:
        super().__init__("the database is locked")
        self.error = error


class SQLiteDatabase:
    """One SQLite file, written through a group-commit writer (module docstring).

    ``group_commit`` (default on) lets concurrent writes share a transaction, at most
    ``max_batch`` of them; ``readers`` is the number of read connections. Nothing is
    opened until the first call; :meth:`close` finishes the queued writes, checkpoints
    and closes every connection. A subclass names its ``schema``, which
    :meth:`migrate` applies.
    """

    schema: ClassVar[Schema]

    def __init__(
        self,
        path: Path,
        *,
        group_commit: bool = True,
        max_batch: int = MAX_BATCH,
        readers: int = READERS,
    ) -> None:
        if max_batch < 1 or readers < 1:
            raise ValueError("max_batch and readers must be at least 1")
        self.path = Path(path)
        self._max_batch = max_batch if group_commit else 1
        self._readers_count = readers
        self._lock = threading.Lock()
        self._closed = False
        # The writing connection, used on the event loop only (see the module docstring).
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Write] = []
        #: Operations waiting for their ``after`` (see _park).
        self._parked: list[_Write] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._busy_since: float | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._wal = WalCheckpoints(self.path)
        self._open_error: BaseException | None = None
        self._open_failed_at = 0.0
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._commits = 0
        self._scrub_pending = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def checkpoints(self) -> int:
        """Checkpoints the checkpointer thread has completed (for metrics and tests)."""
        return self._wal.completed

    @property
    def writer_checkpoints(self) -> int:
        """Checkpoints the writer ran itself because the WAL outgrew the checkpointer."""
        return self._wal.by_writer

    def wal_bytes(self) -> int | None:
        """The bytes of the frames in the WAL since it last started over, or the WAL
        file's size when its index cannot be read; None before the first write."""
        return self._wal.wal_bytes(self._conn)

    @property
    def commits(self) -> int:
        """Transactions the writer has committed so far (for metrics and tests)."""
        return self._commits

    # -- schema --------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version, in one transaction that
        holds the database's write lock (:mod:`cardvault.storage.migrations`)."""
        schema = self.schema
        await self._write(lambda conn: apply_migrations(conn, schema), compound=True)

    # -- connections ---------------------------------------------------------------------

    def _start(self) -> ThreadPoolExecutor:
        """Open the writing connection and start the read pool on first use; open the
        writing connection again if it failed last time (at most every
        ``REOPEN_AFTER_S``). Caller holds ``_lock``."""
        if self._closed:
            raise RuntimeError(f"the {type(self).__name__} is closed")
        if self._conn is None and (
            self._open_error is None or time.monotonic() - self._open_failed_at >= REOPEN_AFTER_S
        ):
            self._open_writer()
        if self._readers is None:
            self._readers = ThreadPoolExecutor(
                max_workers=self._readers_count, thread_name_prefix="cardvault-sqlite-read"
            )
        return self._readers

    def _open_writer(self) -> None:
        try:
            ensure_private_file(self.path)
            conn = connect(self.path, writer=True)
        except Exception as exc:
            self._open_failed(exc)
            return
        try:
            self._wal.attach(conn)
            # Never wait inside SQLite on the event loop: a lock held by another
            # process makes the flush retry a little later instead.
            conn.execute("PRAGMA busy_timeout = 0")
        except Exception as exc:
            conn.close()
            self._open_failed(exc)
            return
        self._conn = conn
        self._open_error = None

    def _open_failed(self, exc: BaseException) -> None:
        self._open_error = exc
        self._open_failed_at = time.monotonic()

    def _unavailable(self) -> StoreUnavailable:
        """Why there is no writing connection, as the caller gets it."""
        cause = self._open_error
        error = None if cause is None else unavailable(cause)
        return error if error is not None else store_unavailable(CANNOT_OPEN, cause)

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        erases: bool = False,
        compound: bool = False,
        insert: Insert | None = None,
        after: asyncio.Future[Any] | None = None,
    ) -> T:
        """Run ``fn`` in the writer's next transaction; its result once it is durable
        (``erases``, ``compound``, ``insert``: see :class:`_Write`).

        With ``after``, in the first transaction that runs once ``after`` is settled:
        queued now, so that it joins the flush of this loop pass when ``after`` (an
        audit record of the same pass, whose log flushes first) is settled by then; a
        flush that finds it unsettled leaves it for the flush that follows it. ``fn``
        itself checks how ``after`` settled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._start()
        if self._conn is None:
            raise self._unavailable() from self._open_error
        self._pending.append(_Write(fn, loop, future, erases, compound, insert, after))
        if self._flush_handle is None or self._flush_loop is not loop:
            # (A flush scheduled on another event loop, one that has since stopped,
            # would never run: each loop gets its own.)
            self._flush_handle = loop.call_soon(self._flush_next, loop)
            self._flush_loop = loop
        return await future

    async def _lookup(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A lookup by primary key: run on the event loop through the writing
        connection, between two flushes (a few microseconds, where handing it to a read
        thread and back costs far more). A busy answer from SQLite sends it to a read
        connection instead."""
        with self._lock:
            self._start()
        conn = self._conn
        if conn is not None and not conn.in_transaction:
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                    error = unavailable(exc)
                    if error is None:
                        raise
                    raise error from exc
        return await self._read(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on a read connection, on the read pool's threads."""
        with self._lock:
            pool = self._start()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._run_read, fn)
        except (sqlite3.Error, OSError) as exc:
            error = unavailable(exc)
            if error is None:
                raise
            raise error from exc

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # The writing connection, opened before any read is submitted, created the
            # file (mode 0600) and turned WAL on.
            if self._conn is None:
                raise self._unavailable() from self._open_error
            conn = connect(self.path, writer=False)
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        return fn(conn)

    # -- the writer ----------------------------------------------------------------------

    def _flush_next(self, loop: asyncio.AbstractEventLoop) -> None:
        # The flush runs one loop iteration after the first write rather than in the
        # next: the requests whose callbacks were already queued then join it. On the
        # tokenization benchmark this made batches larger and cut the vault's CPU per
        # request by about 6%; a lone write waits one idle iteration more (microseconds).
        self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Commit what was queued in this loop iteration, then settle its callers."""
        self._flush_handle = None
        conn = self._conn
        assert conn is not None
        if any(op.after is not None and not op.after.done() for op in self._pending):
            self._park()
        while self._pending:
            batch = self._pending[: self._max_batch]
            try:
                outcomes = self._commit(conn, batch)
            except _Busy as busy:
                now = time.monotonic()
                if self._busy_since is None:
                    self._busy_since = now
                if now - self._busy_since < BUSY_TIMEOUT_S:
                    loop = batch[0].loop
                    self._flush_handle = loop.call_later(BUSY_RETRY_S, self._flush)
                    self._flush_loop = loop
                    return
                outcomes = [(op, None, copy_error(busy.error)) for op in batch]
            except Exception as exc:  # a bug: never leave a caller waiting forever
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                outcomes = [(op, None, copy_error(exc)) for op in batch]
            self._busy_since = None
            del self._pending[: len(batch)]
            settle_on_their_loops(
                [
                    (op.loop, op.future, v, None if e is None else translated(e))
                    for op, v, e in outcomes
                ]
            )

    def _park(self) -> None:
        """Take the operations whose ``after`` is not settled out of this flush; each
        comes back, and a flush is scheduled, once it is."""
        ready = []
        for op in self._pending:
            if op.after is not None and not op.after.done():
                self._parked.append(op)
                op.after.add_done_callback(functools.partial(self._unpark, op))
            else:
                ready.append(op)
        self._pending = ready

    def _unpark(self, op: _Write, _settled: asyncio.Future[Any]) -> None:
        for i, parked in enumerate(self._parked):
            if parked is op:
                del self._parked[i]
                break
        else:
            return
        self._pending.append(op)
        if not self._closed and (self._flush_handle is None or self._flush_loop is not op.loop):
            self._flush_handle = op.loop.call_soon(self._flush)
            self._flush_loop = op.loop

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write]) -> list[_Outcome]:
        if self._insert_alone(conn, batch):
            self._committed(conn, batch[0].loop)
            return [(op, None, None) for op in batch]
        outcomes: list[_Outcome] = []
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname == "SQLITE_BUSY":
                    raise _Busy(exc) from exc
                raise
            i = 0
            while i < len(batch):
                run = self._insert_run(conn, batch, i)
                i += len(run)
                if len(run) > 1 and self._insert_many(conn, run):
                    outcomes.extend((op, None, None) for op in run)
                else:
                    # One operation, or a merged insert that failed: one by one, so
                    # that each gets its own outcome.
                    outcomes.extend(self._run_one(conn, op) for op in run)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # BEGIN, a savepoint or COMMIT failed: nothing of this batch is durable.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return [(op, None, copy_error(exc)) for op in batch]
        self._committed(conn, batch[0].loop)
        if self._scrub_pending or any(op.erases for op in batch):
            try:
                self._scrub_pending = not self._wal.scrub(conn, wait=False)
            except sqlite3.Error as exc:
                # The batch is committed whatever becomes of the scrub (a full disk can
                # refuse the checkpoint): its callers get their outcomes, and the scrub
                # is tried again after the next transaction.
                self._scrub_pending = True
                _log.warning("sqlite_scrub_failed", error=str(exc))
        return outcomes

    def _committed(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Count a commit and let the WAL's keeper checkpoint if it is due."""
        self._commits += 1
        self._wal.after_commit(conn, loop)

    @staticmethod
    def _run_one(conn: sqlite3.Connection, op: _Write) -> _Outcome:
        """Run one operation inside the batch's transaction; it fails alone."""
        if op.compound:
            conn.execute("SAVEPOINT op")
        try:
            value = op.fn(conn)
        except BINDING_ERRORS as exc:
            # Nothing ran: the value could not even be bound to the statement.
            if op.compound:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            error = UnstorableValue("a value cannot be stored")
            error.__cause__ = exc
            return (op, None, error)
        except Exception as exc:
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error): the
                # batch is lost and must not go on in autocommit.
                raise sqlite3.OperationalError("the transaction was rolled back") from exc
            # Undo this operation alone; the rest of the batch goes on. A single
            # statement that fails has already been undone by SQLite itself (its ABORT
            # conflict resolution keeps the transaction).
            if op.compound:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            return (op, None, exc)
        if op.compound:
            conn.execute("RELEASE op")
        return (op, value, None)

    def _insert_alone(self, conn: sqlite3.Connection, batch: list[_Write]) -> bool:
        """Commit a batch of nothing but plain inserts into one table as one multi-row
        ``INSERT`` in autocommit mode: a statement is atomic, and SQLite commits (and
        fsyncs) it within the same call, so the writer takes the GIL back once for the
        whole batch rather than after ``BEGIN``, the insert and ``COMMIT`` each. False,
        with nothing written, when the batch is not like that or the statement failed:
        the caller then commits the batch the general way, where each operation gets its
        own outcome."""
        if len(batch) < 2 or self._scrub_pending:
            return False
        if len(self._insert_run(conn, batch, 0)) != len(batch):
            return False
        try:
            return self._insert_many(conn, batch)
        except sqlite3.Error:
            return False

    @staticmethod
    def _insert_run(conn: sqlite3.Connection, batch: list[_Write], start: int) -> list[_Write]:
        """The plain inserts into one table that follow each other from ``start``, as
        many as one statement can bind."""
        first = batch[start].insert
        if first is None:
            return batch[start : start + 1]
        most = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(first.columns))
        end = start + 1
        while end < len(batch) and end - start < most:
            nxt = batch[end].insert
            if nxt is None or nxt.table != first.table or nxt.columns != first.columns:
                break
            end += 1
        return batch[start:end]

    @staticmethod
    def _insert_many(conn: sqlite3.Connection, run: list[_Write]) -> bool:
        """Insert every row of ``run`` with one statement. False (and nothing inserted:
        SQLite undoes a failed statement whole) if it failed while the transaction goes
        on, so that the caller inserts them one by one and each gets its own outcome."""
        first = run[0].insert
        assert first is not None
        row = "(" + ", ".join("?" * len(first.columns)) + ")"
        # Built only from the constant table and column names, never from input.
        sql = (
            f"INSERT INTO {first.table} ({column_list(first.columns)}) "  # noqa: S608
            f"VALUES {', '.join([row] * len(run))}"
        )
        params = [value for op in run if op.insert is not None for value in op.insert.params]
        try:
            conn.execute(sql, params)
        except sqlite3.Error:
            if not conn.in_transaction:
                raise
            return False
        except BINDING_ERRORS:
            # A value could not be bound (a lone surrogate, a huge integer): the
            # statement never ran. One by one, the bad row fails alone.
            return False
        return True

    # -- lifecycle -----------------------------------------------------------------------

    def _close_readers(self, readers: ThreadPoolExecutor) -> None:
        readers.shutdown(wait=True)
        with self._lock:
            read_conns, self._read_conns = self._read_conns, []
        for conn in read_conns:
            conn.close()

    async def close(self) -> None:
        """Finish the queued writes, scrub and close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers = self._readers
        await asyncio.to_thread(self._wal.shutdown)
        if readers is not None:
            await asyncio.to_thread(self._close_readers, readers)
        conn = self._conn
        if conn is None:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._parked:
            # Their audit records are being flushed: they are written after them.
            await asyncio.wait({op.after for op in self._parked if op.after is not None})
            await asyncio.sleep(0)
        while self._pending:
            self._flush()
            if self._flush_handle is not None:  # another process holds the lock
                self._flush_handle.cancel()
                self._flush_handle = None
                await asyncio.sleep(BUSY_RETRY_S)
        # The writer closes last, with no reader left, so its final checkpoint can
        # truncate the WAL.
        with contextlib.suppress(sqlite3.Error):
            self._wal.scrub(conn, wait=True)
        conn.close()
        # Last: its descriptor must outlive every connection (see wal._WalIndex).
        self._wal.close_index()
        self._conn = None
