"""Keeping a SQLite store's write-ahead log small and free of erased data.

* **Checkpoints off the writer.** SQLite's automatic checkpoint is off for the writing
  connection: it would copy megabytes and fsync the database inside a ``COMMIT``,
  stopping the event loop for tens of milliseconds. Once the WAL holds
  ``CHECKPOINT_WAL_BYTES`` of frames, a checkpoint runs on a thread of its own; if
  under sustained writes it never catches up, the writer checkpoints itself between two
  transactions at ``CHECKPOINT_FALLBACK_FACTOR`` times that.
* **The WAL file is reused.** It keeps its size when the WAL starts over, so that
  commits overwrite blocks the file already has instead of growing it: an fsync that
  must also journal a new file size made a commit 120-200 µs (30-40%) dearer here. The
  file is cut back only after a WAL of the fallback size. How full the WAL is therefore
  comes from its index (:class:`_WalIndex`), not from the file's size.
* **Scrubbing.** In WAL mode the old versions of a page still sit in earlier WAL frames
  after ``secure_delete`` zeroed it, so after a transaction that erases data the writer
  runs ``PRAGMA wal_checkpoint(TRUNCATE)`` before it answers: the zeroed pages are
  copied into the database and the WAL is cut to zero bytes. If a reader holds the WAL
  at that moment, the scrub is retried after every later transaction and when the store
  closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from cardvault.storage.sqlite.connection import BUSY_TIMEOUT_S, connect

__all__ = [
    "CHECKPOINT_FALLBACK_FACTOR",
    "CHECKPOINT_WAL_BYTES",
    "SCRUB_WAIT_MS",
    "WalCheckpoints",
]

_log = structlog.get_logger("cardvault.storage")

#: The size of the WAL at which the checkpointer thread copies it into the database
#: (SQLite's own default is 1000 pages, about 4 MiB).
CHECKPOINT_WAL_BYTES = 4 * 1024 * 1024

#: At this multiple of ``CHECKPOINT_WAL_BYTES`` the writer checkpoints on its own.
CHECKPOINT_FALLBACK_FACTOR = 4

#: How long the writer waits for readers to leave the WAL before giving up on a
#: scrubbing checkpoint for this transaction (it retries after the next one). Short,
#: because every queued write waits with it.
SCRUB_WAIT_MS = 20


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


class WalCheckpoints:
    """The checkpoints and scrubs of one database's WAL (module docstring). The writer
    calls :meth:`attach` with its connection, :meth:`after_commit` after each commit and
    :meth:`scrub` after one that erased data; :meth:`shutdown` and then, once every
    connection is closed, :meth:`close_index` end it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wal_path = path.with_name(path.name + "-wal")
        self._index = _WalIndex(path.with_name(path.name + "-shm"))
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cardvault-sqlite-checkpoint"
        )
        #: The checkpointer thread's own connection (it writes to the database file).
        self._conn: sqlite3.Connection | None = None
        self._running = False
        self._frame_bytes = 0
        self._size_limit_restored = False
        #: Checkpoints the checkpointer thread has completed.
        self.completed = 0
        #: Checkpoints the writer ran itself because the WAL outgrew the checkpointer.
        self.by_writer = 0

    def attach(self, writer: sqlite3.Connection) -> None:
        """Take over the writing connection's checkpoints."""
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute(
            f"PRAGMA journal_size_limit={CHECKPOINT_WAL_BYTES * CHECKPOINT_FALLBACK_FACTOR}"
        )
        (page_size,) = writer.execute("PRAGMA page_size").fetchone()
        self._frame_bytes = int(page_size) + 24  # a WAL frame's header is 24 bytes

    def wal_bytes(self, writer: sqlite3.Connection | None) -> int | None:
        """The bytes of the frames in the WAL since it last started over (copied or not:
        what a checkpoint would have to look at), or the WAL file's size when its index
        cannot be read; None before the first write."""
        frames = self._index.frames() if writer is not None else None
        if frames is not None:
            return frames * self._frame_bytes
        if self._index.failed and not self._size_limit_restored and writer is not None:
            # The file's size must mean something again: cut it back when the WAL starts
            # over, as before the index was read (else, once it had grown to the
            # fallback size, every commit would checkpoint on the loop).
            self._size_limit_restored = True
            with contextlib.suppress(sqlite3.Error):
                writer.execute(f"PRAGMA journal_size_limit={CHECKPOINT_WAL_BYTES // 4}")
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return None

    def after_commit(self, writer: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Start a checkpoint on the checkpointer thread once the WAL has grown past
        ``CHECKPOINT_WAL_BYTES``; checkpoint on the writer past the fallback size."""
        size = self.wal_bytes(writer)
        if size is None:
            return
        if size >= CHECKPOINT_WAL_BYTES * CHECKPOINT_FALLBACK_FACTOR:
            # Under sustained writes a checkpoint beside the writer may never catch up
            # with it, and the WAL is only started over once one has. Then the writer
            # checkpoints itself, between two transactions, as SQLite would.
            self.by_writer += 1
            with contextlib.suppress(sqlite3.Error):
                writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return
        if self._running or size < CHECKPOINT_WAL_BYTES:
            return
        self._running = True
        done = loop.run_in_executor(self._thread, self._run)
        done.add_done_callback(self._done)

    def _run(self) -> None:
        # PASSIVE: copies what no reader still needs and never blocks the writer; the
        # next transaction then starts the WAL over from its beginning. The connection
        # has synchronous=FULL, so the database is fsynced before the WAL is reused.
        if self._conn is None:
            self._conn = connect(self._path, writer=False, query_only=False)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _done(self, done: asyncio.Future[None]) -> None:
        self._running = False
        if done.cancelled():
            return
        if done.exception() is not None:
            _log.warning("sqlite_checkpoint_failed", error=str(done.exception()))
        else:
            self.completed += 1

    @staticmethod
    def scrub(writer: sqlite3.Connection, *, wait: bool) -> bool:
        """Checkpoint and truncate the WAL so that the earlier versions of erased rows
        are gone from it. True if it completed."""
        wait_ms = int(BUSY_TIMEOUT_S * 1000) if wait else SCRUB_WAIT_MS
        writer.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            busy, _, _ = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            writer.execute("PRAGMA busy_timeout = 0")
        return int(busy) == 0

    def shutdown(self) -> None:
        """Wait for a running checkpoint and close the thread's connection (blocking)."""
        self._thread.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close_index(self) -> None:
        """Last: after every connection to the database in this process is closed."""
        self._index.close()
