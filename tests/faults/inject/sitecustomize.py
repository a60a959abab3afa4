"""A full disk for one directory, injected into a real process that is not root.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the fault tests start
the vault with this directory on its ``PYTHONPATH`` and ``FAULTS_ENOSPC_FLAG`` naming a
file. While that file exists and holds a directory's path, every ``os.write`` to a file
under that directory, and every ``os.pwrite`` that would grow one, fails with
``ENOSPC``, as on a full disk: the audit log's appends, a new ``audit.head``; rewriting
bytes a file already has (``audit.tail``'s mark) still works, as it does on a full
tmpfs. Nothing else of the process is touched: its sockets, its database (written by
SQLite's own C code, or over the network) and its other files behave as usual.

Why not a small tmpfs: mounting one needs root. The tests mount one when they are root
and use this otherwise, so that the full-disk scenario always runs.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_FLAG = os.environ.get("FAULTS_ENOSPC_FLAG")


def _full(fd: int) -> bool:
    """Whether ``fd`` is a file under the directory the flag names (the flag exists)."""
    assert _FLAG is not None
    try:
        with open(_FLAG, encoding="utf-8") as fh:
            directory = fh.read().strip().rstrip("/")
    except OSError:
        return False
    if not directory:
        return False
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return path.startswith(directory + "/")


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if _FLAG:
    _write = os.write
    _pwrite = os.pwrite

    def _full_write(fd: int, data: ReadableBuffer, /) -> int:
        if _full(fd):
            raise _no_space()
        return _write(fd, data)

    def _full_pwrite(fd: int, data: ReadableBuffer, offset: int, /) -> int:
        if offset + memoryview(data).nbytes > os.fstat(fd).st_size and _full(fd):
            raise _no_space()
        return _pwrite(fd, data, offset)

    os.write = _full_write
    os.pwrite = _full_pwrite
