"""Private files: written whole or not at all, mode 0600, durably. The one writer.

Every file that holds a key, a certificate, a share, a checkpoint or a credential is
written through here, so that each such file gets the same four guarantees:

* **mode 0600 whatever the umask**: the file is created 0600 and ``fchmod``-ed to 0600
  before a byte of data is in it, so it is never readable by others, not even briefly;
* **whole or not at all**: the data goes to a temporary file beside the target, which
  is fsynced and then renamed (or linked) into place, so a crash leaves the old file or
  the new one, never half a key;
* **durable**: the directory is fsynced after the rename, so the new name survives a
  power cut;
* **no surprise through a link**: the temporary file is opened ``O_EXCL | O_NOFOLLOW``.

:func:`write_private` replaces, :func:`create_private` creates only if absent (a key
made on first start). Two more create private files that something else then fills:
:func:`ensure_private_file`, an empty file for SQLite to open, and
:func:`open_private_append`, a descriptor for a log that grows a line at a time (the
audit log). :func:`read_last_lines` reads such a log's tail.

A top-level module with no ``cardvault`` imports, so that every zone may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "PRIVATE_MODE",
    "create_private",
    "ensure_private_file",
    "fsync_dir",
    "open_private_append",
    "read_last_lines",
    "write_private",
    "write_private_stream",
]

PRIVATE_MODE = 0o600


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_aside(path: Path, data: bytes | bytearray) -> Path:
    """``data`` in a new fsynced 0600 file beside ``path``; its path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # the umask may have taken bits away; now exactly 0600
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp


def _put(path: Path, data: bytes | bytearray, place: Callable[[Path, Path], None]) -> bool:
    """Write ``data`` aside and ``place`` it at ``path`` (rename or link); False when a
    link finds ``path`` taken. The temporary file never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_aside(path, data)
    try:
        place(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):  # gone already after a rename
            tmp.unlink()
    fsync_dir(path.parent)
    return True


def write_private(path: Path, data: bytes | bytearray) -> None:
    """Write ``data`` to ``path`` (mode 0600), replacing any file there, atomically and
    durably. Missing parent directories are made (with the default mode)."""
    _put(path, data, os.replace)


def write_private_stream(path: Path, chunks: Iterable[bytes]) -> None:
    """Like :func:`write_private`, for data made a piece at a time (a mapping file of a
    million rows): the pieces go to the fsynced 0600 temporary file as they come, which
    is then renamed into place; memory holds one piece at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)


def create_private(path: Path, data: bytes | bytearray) -> bool:
    """Create ``path`` with ``data`` (mode 0600) unless it exists; True when created.

    Like :func:`write_private`, but an existing file is left as it is (False): of two
    processes racing to create a key, one wins and the other reads the winner's. The
    file is linked into place whole, so a crash never leaves half a key behind.
    """
    return _put(path, data, os.link)


def ensure_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist; True when created.

    For files another library then opens and fills (a SQLite database), which would
    otherwise create them with the umask's mode. Its directory, if missing, is made
    with mode 0700 (any missing ones above it with the default mode). An existing file,
    or a link of any kind at ``path``, is left as it is.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return True


def open_private_append(path: Path) -> int:
    """A file descriptor that appends to ``path``, which is created (mode 0600, its
    directory entry fsynced) if missing. An existing file keeps its mode; a link at
    ``path`` is refused (``OSError``). The caller closes the descriptor. For logs that
    grow a line at a time: wrap it with ``os.fdopen(fd, "ab")`` for a file object."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        fsync_dir(Path(path).parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_last_lines(path: Path, count: int, *, block: int = 65536) -> tuple[list[bytes], bool]:
    """The last ``count`` lines of ``path`` (oldest first, newlines kept) and whether the
    file ends with a newline. A final line without its newline is returned as it is.
    """
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        pos = end
        # count + 1 newlines bound count complete lines (the last one ends the file).
        while pos > 0 and data.count(b"\n") <= count:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    if not data:
        return [], True
    ends_with_newline = data.endswith(b"\n")
    lines = data.splitlines(keepends=True)
    if pos > 0:
        lines = lines[1:]  # the first piece may be the tail of an earlier line
    return lines[-count:], ends_with_newline
