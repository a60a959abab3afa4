"""cardvault.files: the one writer of private files (keys, certificates, checkpoints).

The audit log was its first user (``audit.key``, ``audit.pub``, ``audit.head``), hence
this suite's place; the certificate files and the CLI's key files go through it too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cardvault import files
from cardvault.files import (
    create_private,
    ensure_private_file,
    open_private_append,
    read_last_lines,
    write_private,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(params=[0o000, 0o022, 0o077, 0o277], ids=lambda m: f"umask {m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories fsynced, in order."""
    seen: list[Path] = []
    real = files.fsync_dir

    def record(directory: Path) -> None:
        seen.append(Path(directory))
        real(directory)

    monkeypatch.setattr(files, "fsync_dir", record)
    return seen


def test_write_private_makes_a_0600_file_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "a.key"
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert mode(path) == 0o600
    assert leftovers(tmp_path) == []


def test_write_private_replaces_a_file_and_its_mode(tmp_path: Path, synced: list[Path]) -> None:
    path = tmp_path / "a.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private(path, bytearray(b"new"))
    assert (path.read_bytes(), mode(path)) == (b"new", 0o600)
    assert synced == [tmp_path]  # the rename is made durable
    assert leftovers(tmp_path) == []


def test_write_private_makes_missing_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.key"
    write_private(path, b"x")
    assert path.read_bytes() == b"x"


def test_write_private_replaces_a_link_not_what_it_points_to(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "a.key"
    link.symlink_to(victim)
    write_private(link, b"key")
    assert victim.read_bytes() == b"untouched"
    assert not link.is_symlink() and link.read_bytes() == b"key"


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.key"
    write_private(path, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_private(path, b"new")
    with pytest.raises(OSError, match="No space"):
        create_private(tmp_path / "b.key", b"new")
    assert path.read_bytes() == b"old"
    assert not (tmp_path / "b.key").exists()
    assert leftovers(tmp_path) == []


def test_create_private_creates_once_and_never_replaces(
    tmp_path: Path, umask: int, synced: list[Path]
) -> None:
    path = tmp_path / "audit.key"
    assert create_private(path, b"first") is True
    assert synced == [tmp_path]
    assert create_private(path, b"second") is False
    assert (path.read_bytes(), mode(path)) == (b"first", 0o600)
    assert leftovers(tmp_path) == []


def test_ensure_private_file_creates_an_empty_0600_file_once(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "vault.db"
    assert ensure_private_file(path) is True
    assert (path.read_bytes(), mode(path)) == (b"", 0o600)
    path.write_bytes(b"data")
    assert ensure_private_file(path) is False
    assert path.read_bytes() == b"data"


def test_ensure_private_file_makes_its_missing_directory_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "state" / "keys" / "vault.db"
        assert ensure_private_file(path) is True
    finally:
        os.umask(old)
    assert mode(path.parent) == 0o700


def test_ensure_private_file_does_not_follow_a_link(tmp_path: Path) -> None:
    link = tmp_path / "vault.db"
    link.symlink_to(tmp_path / "elsewhere")  # dangling
    assert ensure_private_file(link) is False
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("content", "count", "expected"),
    [
        (b"", 2, ([], True)),
        (b"a\n", 2, ([b"a\n"], True)),
        (b"a\nb\nc\n", 2, ([b"b\n", b"c\n"], True)),
        (b"a\nb\nc", 2, ([b"b\n", b"c"], False)),
        (b"a\nb\nc\n", 5, ([b"a\n", b"b\n", b"c\n"], True)),
    ],
)
def test_read_last_lines(
    tmp_path: Path, content: bytes, count: int, expected: tuple[list[bytes], bool]
) -> None:
    path = tmp_path / "log"
    path.write_bytes(content)
    assert read_last_lines(path, count) == expected


def test_read_last_lines_across_small_blocks(tmp_path: Path) -> None:
    path = tmp_path / "log"
    lines = [f"record {i:04d} ".encode() * 3 + b"\n" for i in range(200)]
    path.write_bytes(b"".join(lines))
    for block in (1, 7, 64, 1000):
        assert read_last_lines(path, 2, block=block) == (lines[-2:], True)


def test_open_private_append_creates_0600_and_appends(
    tmp_path: Path, umask: int, synced: list[Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    fd = open_private_append(path)
    try:
        os.write(fd, b"one\n")
    finally:
        os.close(fd)
    assert mode(path) == 0o600
    assert synced == [tmp_path]  # a new log's name is durable before its first record
    fd = open_private_append(path)
    try:
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"one\ntwo\n"
    assert synced == [tmp_path]


def test_open_private_append_keeps_an_existing_files_mode_and_refuses_a_link(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"one\n")
    path.chmod(0o640)
    os.close(open_private_append(path))
    assert mode(path) == 0o640
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(OSError):
        open_private_append(link)
