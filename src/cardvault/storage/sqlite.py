"""The embedded default :class:`~cardvault.storage.base.VaultStore`: one SQLite file.

Durability and erasure:

* WAL with ``synchronous=FULL``: a commit is fsynced before the method returns.
* ``secure_delete=ON``: SQLite overwrites deleted content with zeros. In WAL mode the
  old versions of a page still sit in earlier WAL frames, so after a transaction that
  erases card data (delete, CVC erasure) the writer also runs
  ``PRAGMA wal_checkpoint(TRUNCATE)`` before it answers: the zeroed pages are copied
  into the database and the WAL is cut to zero bytes. If a reader holds the WAL at that
  moment, the checkpoint is retried after every later transaction and when the store
  closes.
* The file is created with mode 0600 (SQLite gives ``-wal`` and ``-shm`` the mode of the
  database), in a directory created with mode 0700.

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
* Lookups by primary key (a payment method, a forwarding request, an API key, an
  account, a data key) run on the event loop through the writing connection, between
  flushes: they take microseconds, and a hand-off to a thread and back costs more.
  Other reads (lists) run on a small pool of threads, each with its own connection (WAL
  readers do not block the writer or each other). Both see every committed write.

A caller that is cancelled while its write is queued cannot tell whether it happened:
the operation may still be committed.

The store belongs to the event loop that writes to it; a write from another loop is
settled on that loop, but the flush runs on the loop that scheduled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cardvault.storage._shared import column_list, copy_error, settle
from cardvault.storage.base import (
    Account,
    ApiKey,
    DataKeyRecord,
    DuplicateError,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    UnstorableValue,
)
from cardvault.storage.migrations import (
    ACCOUNT_COLUMNS,
    API_KEY_COLUMNS,
    DATA_KEY_COLUMNS,
    FORWARDING_COLUMNS,
    IDEMPOTENCY_COLUMNS,
    MIGRATIONS,
    PAYMENT_METHOD_COLUMNS,
    SCHEMA_VERSION_TABLE,
    account_from_row,
    account_params,
    api_key_from_row,
    api_key_params,
    data_key_from_row,
    data_key_params,
    forwarding_from_row,
    forwarding_params,
    idempotency_from_row,
    idempotency_params,
    payment_method_from_row,
    payment_method_params,
    render,
)

__all__ = ["SQLiteVaultStore"]

T = TypeVar("T")
R = TypeVar("R")

_log = structlog.get_logger("cardvault.storage")

#: The most operations one transaction carries. Larger batches spread one fsync over
#: more writes but stop the loop longer; at ~60k rows/s a full batch takes under 10 ms.
MAX_BATCH = 512

#: How long a write waits for a lock held by another process before failing.
BUSY_TIMEOUT_S = 10.0

#: How soon the writer tries again when another process holds the write lock.
BUSY_RETRY_S = 0.002

#: How long the writer waits for readers to leave the WAL before giving up on a
#: scrubbing checkpoint for this transaction (it retries after the next one). Short,
#: because every queued write waits with it.
SCRUB_WAIT_MS = 20

#: Read connections (threads).
READERS = 4

#: The size of the WAL at which the checkpointer thread copies it into the database
#: (SQLite's own default is 1000 pages, about 4 MiB).
CHECKPOINT_WAL_BYTES = 4 * 1024 * 1024

#: At this multiple of ``CHECKPOINT_WAL_BYTES`` the writer checkpoints on its own.
CHECKPOINT_FALLBACK_FACTOR = 4


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    marks = ", ".join("?" for _ in columns)
    # Built only from the constant table and column names above, never from input.
    return f"INSERT INTO {table} ({column_list(columns)}) VALUES ({marks})"  # noqa: S608


_INSERT_ACCOUNT = _insert_sql("accounts", ACCOUNT_COLUMNS)
_INSERT_API_KEY = _insert_sql("api_keys", API_KEY_COLUMNS)
_INSERT_DATA_KEY = _insert_sql("data_keys", DATA_KEY_COLUMNS)
_INSERT_PM = _insert_sql("payment_methods", PAYMENT_METHOD_COLUMNS)
_INSERT_FWD = _insert_sql("forwarding_requests", FORWARDING_COLUMNS)
_SELECT_FWD = f"SELECT {column_list(FORWARDING_COLUMNS)} FROM forwarding_requests"  # noqa: S608
_INSERT_IDEMPOTENCY = (
    _insert_sql("idempotency_keys", IDEMPOTENCY_COLUMNS)
    + " ON CONFLICT (account_id, mode, idempotency_key) DO NOTHING"
)
_SELECT_ACCOUNT = f"SELECT {column_list(ACCOUNT_COLUMNS)} FROM accounts"  # noqa: S608 (constant columns)
_SELECT_API_KEY = f"SELECT {column_list(API_KEY_COLUMNS)} FROM api_keys"  # noqa: S608
_SELECT_DATA_KEY = f"SELECT {column_list(DATA_KEY_COLUMNS)} FROM data_keys"  # noqa: S608
_SELECT_PM = f"SELECT {column_list(PAYMENT_METHOD_COLUMNS)} FROM payment_methods"  # noqa: S608
_SELECT_IDEMPOTENCY = f"SELECT {column_list(IDEMPOTENCY_COLUMNS)} FROM idempotency_keys"  # noqa: S608

_DUPLICATE_CODES = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _insert(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], what: str) -> None:
    try:
        conn.execute(sql, params)
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname in _DUPLICATE_CODES:
            raise DuplicateError(f"{what} with this id or unique value exists") from exc
        raise


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL needs an exclusive lock and does not wait in SQLite's busy
    # handler, so two processes opening a new file at once retry here.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError("the database cannot use write-ahead logging")


def _connect(path: Path, *, writer: bool, query_only: bool | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        if writer:
            _enable_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        # Deleted card data is overwritten with zeros, not left in free space.
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        if writer:
            # Checkpoints run on a thread of their own (see the module docstring). The
            # WAL file keeps its size when the WAL starts over, so that commits
            # overwrite blocks the file already has instead of growing it: an fsync
            # that must also journal a new file size made a commit 120-200 µs (30-40%)
            # dearer here. The file is cut back only after a WAL of the fallback size.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(
                f"PRAGMA journal_size_limit={CHECKPOINT_WAL_BYTES * CHECKPOINT_FALLBACK_FACTOR}"
            )
        if (not writer) if query_only is None else query_only:
            conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private_file(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite opens it (and
    would create it with the umask's mode)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


@dataclass(frozen=True, slots=True)
class _Insert:
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
    #: The operation erases card data, so the WAL must be scrubbed after it commits.
    erases: bool
    #: The operation runs several writing statements, so it runs inside a savepoint to
    #: fail as a whole. Otherwise its one writing statement must be the last thing in
    #: it that can fail (SQLite undoes a failed statement by itself, and a savepoint per
    #: operation would cost about a tenth of the batch's time).
    compound: bool
    #: Set when the operation is one plain insert (``fn`` then does just that insert).
    insert: _Insert | None = None


_Outcome = tuple[_Write, Any, BaseException | None]


class _Busy(Exception):
    """Another connection holds the database's write lock."""

    def __init__(self, error: sqlite3.OperationalError) -> None:
        super().__init__("the database is locked")
        self.error = error


#: What binding a value raises when SQLite cannot hold it: text that does not encode to
#: UTF-8, an integer past 64 bits. The statement never ran.
_BINDING_ERRORS = (UnicodeError, OverflowError)


def _settle(outcomes: list[_Outcome]) -> None:
    """Settle each operation's future, on its own event loop."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    others: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for op, value, error in outcomes:
        if op.loop is running:
            _resolve([(op.future, value, error)])
        else:
            others.setdefault(op.loop, []).append((op.future, value, error))
    for loop, items in others.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        settle(future, value, error)


class _WalIndex:
    """How many frames the WAL holds, read from the WAL-index header in the ``-shm`` file
    (SQLite's documented WAL format, https://www.sqlite.org/walformat.html: ``mxFrame``,
    a 32-bit unsigned integer in native byte order at offset 16, the index of the last
    valid frame; 0 once the WAL has started over). The WAL file's size cannot say it,
    since the file is reused. Read on the event loop by the writer, right after its own
    commit, so no other connection is changing the field. ``frames()`` is None when the
    file cannot be read; the store then falls back to the WAL file's size.

    One descriptor, opened once and kept until every connection of the store is closed:
    on POSIX, closing *any* descriptor of a file drops all of the process's ``fcntl``
    locks on it, SQLite's included (its "How To Corrupt" page, section 2.2), which would
    let another process rebuild the ``-shm`` file under this one's connections. It is
    read with ``pread``, not mapped, so a file cut short can only give a short read."""

    _MX_FRAME = struct.Struct("=I")

    def __init__(self, shm_path: Path) -> None:
        self._path = shm_path
        self._fd: int | None = None
        self._failed = False

    def frames(self) -> int | None:
        if self._failed:
            return None
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            raw = os.pread(self._fd, 4, 16)
        except OSError as exc:
            self._fail(str(exc))
            return None
        if len(raw) != 4:
            self._fail("short read")
            return None
        return int(self._MX_FRAME.unpack(raw)[0])

    def _fail(self, error: str) -> None:
        self._failed = True
        _log.warning("sqlite_wal_index_unreadable", error=error)

    @property
    def failed(self) -> bool:
        return self._failed

    def close(self) -> None:
        """Call only after every connection to the database in this process is closed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SQLiteVaultStore:
    """The vault's store in one SQLite file (the embedded default).

    ``group_commit`` (default on) lets concurrent writes share a transaction, at most
    ``max_batch`` of them; ``readers`` is the number of read connections. Nothing is
    opened until the first call; :meth:`close` finishes the queued writes, checkpoints
    and closes every connection.
    """

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
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._busy_since: float | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpointing = False
        self._checkpoints = 0
        self._writer_checkpoints = 0
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        self._wal_index = _WalIndex(self.path.with_name(self.path.name + "-shm"))
        self._frame_bytes = 0
        self._size_limit_restored = False
        self._open_error: BaseException | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._commits = 0
        self._scrub_pending = False

    def __repr__(self) -> str:
        return f"SQLiteVaultStore({str(self.path)!r})"

    @property
    def checkpoints(self) -> int:
        """Checkpoints the checkpointer thread has completed (for metrics and tests)."""
        return self._checkpoints

    @property
    def writer_checkpoints(self) -> int:
        """Checkpoints the writer ran itself because the WAL outgrew the checkpointer."""
        return self._writer_checkpoints

    def wal_bytes(self) -> int | None:
        """The bytes of the frames in the WAL since it last started over (copied or not:
        what a checkpoint would have to look at), or the WAL file's size when its index
        cannot be read; None before the first write."""
        frames = self._wal_index.frames() if self._conn is not None else None
        if frames is not None:
            return frames * self._frame_bytes
        if self._wal_index.failed and not self._size_limit_restored and self._conn is not None:
            # The file's size must mean something again: cut it back when the WAL starts
            # over, as before the index was read (else, once it had grown to the
            # fallback size, every commit would checkpoint on the loop).
            self._size_limit_restored = True
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute(f"PRAGMA journal_size_limit={CHECKPOINT_WAL_BYTES // 4}")
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return None

    @property
    def commits(self) -> int:
        """Transactions the writer has committed so far (for metrics and tests)."""
        return self._commits

    # -- plumbing ------------------------------------------------------------------------

    def _start(self) -> ThreadPoolExecutor:
        """Open the writing connection and start the read pool on first use. Caller
        holds ``_lock``."""
        if self._closed:
            raise RuntimeError("the vault store is closed")
        if self._readers is None:
            try:
                _create_private_file(self.path)
                conn = _connect(self.path, writer=True)
            except Exception as exc:
                self._open_error = exc
            else:
                # Never wait inside SQLite on the event loop: a lock held by another
                # process makes the flush retry a little later instead.
                conn.execute("PRAGMA busy_timeout = 0")
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                self._frame_bytes = int(page_size) + 24  # a WAL frame's header is 24 bytes
                self._conn = conn
            self._readers = ThreadPoolExecutor(
                max_workers=self._readers_count, thread_name_prefix="cardvault-sqlite-read"
            )
            self._checkpointer = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="cardvault-sqlite-checkpoint"
            )
        return self._readers

    def _unavailable(self) -> RuntimeError:
        error = RuntimeError("the SQLite vault store could not be opened")
        error.__cause__ = self._open_error
        return error

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        erases: bool = False,
        compound: bool = False,
        insert: _Insert | None = None,
    ) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._start()
        if self._conn is None:
            raise self._unavailable()
        self._pending.append(_Write(fn, loop, future, erases, compound, insert))
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
                    raise
        return await self._read(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            pool = self._start()
        return await asyncio.get_running_loop().run_in_executor(pool, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # The writing connection, opened before any read is submitted, created the
            # file (mode 0600) and turned WAL on.
            if self._open_error is not None:
                raise self._unavailable()
            conn = _connect(self.path, writer=False)
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        return fn(conn)

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
            _settle(outcomes)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write]) -> list[_Outcome]:
        if self._insert_alone(conn, batch):
            self._committed(batch[0].loop)
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
        self._committed(batch[0].loop)
        if self._scrub_pending or any(op.erases for op in batch):
            self._scrub_pending = not self._scrub(conn, wait=False)
        return outcomes

    def _committed(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count a commit; start a checkpoint on the checkpointer thread once the WAL has
        grown past ``CHECKPOINT_WAL_BYTES`` (SQLite's automatic checkpoint is off for the
        writing connection: it would copy megabytes and fsync the database inside a
        ``COMMIT``, stopping the event loop for tens of milliseconds)."""
        self._commits += 1
        if self._checkpointer is None:
            return
        size = self.wal_bytes()
        if size is None:
            return
        if size >= CHECKPOINT_WAL_BYTES * CHECKPOINT_FALLBACK_FACTOR and self._conn is not None:
            # Under sustained writes a checkpoint beside the writer may never catch up
            # with it, and the WAL is only started over once one has. Then the writer
            # checkpoints itself, between two transactions, as SQLite would.
            self._writer_checkpoints += 1
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return
        if self._checkpointing or size < CHECKPOINT_WAL_BYTES:
            return
        self._checkpointing = True
        done = loop.run_in_executor(self._checkpointer, self._run_checkpoint)
        done.add_done_callback(self._checkpoint_done)

    def _run_checkpoint(self) -> None:
        # PASSIVE: copies what no reader still needs and never blocks the writer; the
        # next transaction then starts the WAL over from its beginning. The connection
        # has synchronous=FULL, so the database is fsynced before the WAL is reused.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, writer=False, query_only=False)
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = False
        if done.cancelled():
            return
        if done.exception() is not None:
            _log.warning("sqlite_checkpoint_failed", error=str(done.exception()))
        else:
            self._checkpoints += 1

    @staticmethod
    def _run_one(conn: sqlite3.Connection, op: _Write) -> _Outcome:
        """Run one operation inside the batch's transaction; it fails alone."""
        if op.compound:
            conn.execute("SAVEPOINT op")
        try:
            value = op.fn(conn)
        except _BINDING_ERRORS as exc:
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
        except _BINDING_ERRORS:
            # A value could not be bound (a lone surrogate, a huge integer): the
            # statement never ran. One by one, the bad row fails alone.
            return False
        return True

    def _scrub(self, conn: sqlite3.Connection, *, wait: bool) -> bool:
        """Checkpoint and truncate the WAL so that the earlier versions of erased rows
        are gone from it. True if it completed."""
        wait_ms = int(BUSY_TIMEOUT_S * 1000) if wait else SCRUB_WAIT_MS
        conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute("PRAGMA busy_timeout = 0")
        return int(busy) == 0

    # -- schema --------------------------------------------------------------------------

    async def migrate(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # The writer's BEGIN IMMEDIATE holds the database's write lock, so another
            # process migrating at the same time waits and then finds nothing to do.
            conn.execute(SCHEMA_VERSION_TABLE)
            (current,) = conn.execute(
                "SELECT coalesce(max(version), 0) FROM schema_version"
            ).fetchone()
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    conn.execute(render(statement, "sqlite"))
                conn.execute(
                    "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                    (migration.version, int(time.time())),
                )

        await self._write(op, compound=True)

    # -- accounts and keys ---------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        params = account_params(account)
        await self._write(lambda c: _insert(c, _INSERT_ACCOUNT, params, "an account"))

    async def get_account(self, account_id: str) -> Account | None:
        def op(conn: sqlite3.Connection) -> Account | None:
            row = conn.execute(f"{_SELECT_ACCOUNT} WHERE id = ?", (account_id,)).fetchone()
            return None if row is None else account_from_row(row)

        return await self._lookup(op)

    async def set_allowed_origins(self, account_id: str, origins: Sequence[str]) -> bool:
        encoded = json.dumps(list(origins), separators=(",", ":"), ensure_ascii=False)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE accounts SET allowed_origins = ? WHERE id = ?", (encoded, account_id)
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def create_api_key(self, key: ApiKey) -> None:
        params = api_key_params(key)
        await self._write(lambda c: _insert(c, _INSERT_API_KEY, params, "an API key"))

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        def op(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(f"{_SELECT_API_KEY} WHERE hash = ?", (key_hash,)).fetchone()
            return None if row is None else api_key_from_row(row)

        return await self._lookup(op)

    async def list_api_keys(self, account_id: str) -> list[ApiKey]:
        def op(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(
                f"{_SELECT_API_KEY} WHERE account_id = ? ORDER BY created, id", (account_id,)
            ).fetchall()
            return [api_key_from_row(r) for r in rows]

        return await self._read(op)

    async def revoke_api_key(self, key_id: str, when: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (when, key_id),
            )
            return cur.rowcount == 1

        return await self._write(op)

    # -- data keys -----------------------------------------------------------------------

    async def insert_data_key(self, record: DataKeyRecord) -> None:
        params = data_key_params(record)
        await self._write(lambda c: _insert(c, _INSERT_DATA_KEY, params, "a data key"))

    async def get_data_key(self, data_key_id: str) -> DataKeyRecord | None:
        def op(conn: sqlite3.Connection) -> DataKeyRecord | None:
            row = conn.execute(f"{_SELECT_DATA_KEY} WHERE id = ?", (data_key_id,)).fetchone()
            return None if row is None else data_key_from_row(row)

        return await self._lookup(op)

    # -- payment methods -----------------------------------------------------------------

    async def insert_payment_method(self, record: PaymentMethodRecord) -> None:
        params = payment_method_params(record)
        await self._write(
            lambda c: _insert(c, _INSERT_PM, params, "a payment method"),
            insert=_Insert("payment_methods", PAYMENT_METHOD_COLUMNS, params, "a payment method"),
        )

    async def get_payment_method(
        self, account_id: str, livemode: bool, pm_id: str
    ) -> PaymentMethodRecord | None:
        def op(conn: sqlite3.Connection) -> PaymentMethodRecord | None:
            row = conn.execute(
                f"{_SELECT_PM} WHERE id = ? AND account_id = ? AND livemode = ?",
                (pm_id, account_id, bool(livemode)),
            ).fetchone()
            return None if row is None else payment_method_from_row(row)

        return await self._lookup(op)

    async def list_payment_methods(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[PaymentMethodRecord]:
        return await self._list(
            "payment_methods", _SELECT_PM, payment_method_from_row,
            account_id, livemode, limit, starting_after, ending_before,
        )  # fmt: skip

    async def _list(
        self,
        table: str,
        select: str,
        from_row: Callable[[Any], R],
        account_id: str,
        livemode: bool,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
    ) -> list[R]:
        """One page of ``table`` in Stripe's order and cursor semantics (see base.py)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if starting_after is not None and ending_before is not None:
            raise ValueError("give starting_after or ending_before, not both")
        scope = (account_id, bool(livemode))
        where = "account_id = ? AND livemode = ?"
        # A cursor is looked up within the same account and mode: an id from elsewhere
        # matches nothing, so the page is empty.
        cursor = (
            f"(SELECT created, id FROM {table} WHERE id = ? AND account_id = ? AND livemode = ?)"  # noqa: S608 - table is a constant of ours
        )
        if starting_after is not None:
            sql = f"{select} WHERE {where} AND (created, id) < {cursor} ORDER BY created DESC, id DESC LIMIT ?"
            params: tuple[Any, ...] = (*scope, starting_after, *scope, limit)
        elif ending_before is not None:
            # The page just newer than the cursor: the nearest ones first, then reversed.
            sql = f"{select} WHERE {where} AND (created, id) > {cursor} ORDER BY created ASC, id ASC LIMIT ?"
            params = (*scope, ending_before, *scope, limit)
        else:
            sql = f"{select} WHERE {where} ORDER BY created DESC, id DESC LIMIT ?"
            params = (*scope, limit)

        def op(conn: sqlite3.Connection) -> list[R]:
            return [from_row(r) for r in conn.execute(sql, params).fetchall()]

        records = await self._read(op)
        if ending_before is not None:
            records.reverse()
        return records

    async def delete_payment_method(self, account_id: str, livemode: bool, pm_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM payment_methods WHERE id = ? AND account_id = ? AND livemode = ?",
                (pm_id, account_id, bool(livemode)),
            )
            return cur.rowcount == 1

        return await self._write(op, erases=True)

    async def destroy_cvc(self, account_id: str, livemode: bool, pm_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
                "cvc_expires = NULL WHERE id = ? AND account_id = ? AND livemode = ? "
                "AND cvc_ct IS NOT NULL",
                (pm_id, account_id, bool(livemode)),
            )
            return cur.rowcount == 1

        return await self._write(op, erases=True)

    async def destroy_expired_cvcs(self, now: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
                "cvc_expires = NULL WHERE cvc_expires IS NOT NULL AND cvc_expires <= ?",
                (now,),
            )
            return cur.rowcount

        return await self._write(op, erases=True)

    async def take_cvc(
        self, account_id: str, livemode: bool, pm_id: str
    ) -> tuple[bytes, str] | None:
        def op(conn: sqlite3.Connection) -> tuple[bytes, str] | None:
            # The only writing connection runs this whole function inside its
            # transaction, so no other write can come between the read and the erase.
            row = conn.execute(
                "SELECT cvc_ct, cvc_data_key_id FROM payment_methods "
                "WHERE id = ? AND account_id = ? AND livemode = ? AND cvc_ct IS NOT NULL",
                (pm_id, account_id, bool(livemode)),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, cvc_expires = NULL "
                "WHERE id = ?",
                (pm_id,),
            )
            return bytes(row[0]), str(row[1])

        return await self._write(op, erases=True, compound=True)

    # -- forwarding requests -------------------------------------------------------------

    async def insert_forwarding_request(self, record: ForwardingRequestRecord) -> None:
        params = forwarding_params(record)
        await self._write(lambda c: _insert(c, _INSERT_FWD, params, "a forwarding request"))

    async def get_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str
    ) -> ForwardingRequestRecord | None:
        def op(conn: sqlite3.Connection) -> ForwardingRequestRecord | None:
            row = conn.execute(
                f"{_SELECT_FWD} WHERE id = ? AND account_id = ? AND livemode = ?",
                (fwd_id, account_id, bool(livemode)),
            ).fetchone()
            return None if row is None else forwarding_from_row(row)

        return await self._lookup(op)

    async def list_forwarding_requests(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[ForwardingRequestRecord]:
        return await self._list(
            "forwarding_requests", _SELECT_FWD, forwarding_from_row,
            account_id, livemode, limit, starting_after, ending_before,
        )  # fmt: skip

    async def purge_forwarding_requests(self, before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM forwarding_requests WHERE created < ?", (before,)
            ).rowcount

        return await self._write(op, erases=True)

    # -- idempotency ---------------------------------------------------------------------

    async def claim_idempotency_key(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        params = idempotency_params(record)
        pk = (record.account_id, record.mode, record.key)

        def op(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            # Atomic: the writer holds the database's write lock for the whole batch.
            if conn.execute(_INSERT_IDEMPOTENCY, params).rowcount == 1:
                return None
            row = conn.execute(
                f"{_SELECT_IDEMPOTENCY} WHERE account_id = ? AND mode = ? AND idempotency_key = ?",
                pk,
            ).fetchone()
            return idempotency_from_row(row)

        return await self._write(op)

    async def complete_idempotency_key(
        self, account_id: str, mode: Mode, key: str, status: int, body: str
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE idempotency_keys SET response_status = ?, response_body = ? "
                "WHERE account_id = ? AND mode = ? AND idempotency_key = ?",
                (status, body, account_id, mode, key),
            )

        await self._write(op)

    async def release_idempotency_key(self, account_id: str, mode: Mode, key: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM idempotency_keys "
                "WHERE account_id = ? AND mode = ? AND idempotency_key = ?",
                (account_id, mode, key),
            )

        await self._write(op)

    async def purge_idempotency_keys(self, before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM idempotency_keys WHERE created < ?", (before,)
            ).rowcount

        return await self._write(op)

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
            readers, checkpointer = self._readers, self._checkpointer
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.shutdown, wait=True)
        if readers is not None:
            await asyncio.to_thread(self._close_readers, readers)
        conn = self._conn
        if conn is None:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._pending:
            self._flush()
            if self._flush_handle is not None:  # another process holds the lock
                self._flush_handle.cancel()
                self._flush_handle = None
                await asyncio.sleep(BUSY_RETRY_S)
        # The writer closes last, with no reader left, so its final checkpoint can
        # truncate the WAL.
        with contextlib.suppress(sqlite3.Error):
            self._scrub(conn, wait=True)
        conn.close()
        # Last: its descriptor must outlive every connection (see _WalIndex).
        self._wal_index.close()
        self._conn = None
