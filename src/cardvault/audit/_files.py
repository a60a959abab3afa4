"""Small durable-file helpers for the audit log (private)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["create_private", "fsync_dir", "read_last_lines", "replace_private"]


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
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


def replace_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (mode 0600), durably."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def create_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (mode 0600) unless it exists; True when created.

    The file appears whole or not at all (written aside, then linked into place), so a
    crash never leaves half a key behind.
    """
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)
    return True


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
