"""cardvault.pgp: the public-key checks an export recipient passes, and the sweep of
gpg homes left by a process killed while it used gpg."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cardvault import pgp


@pytest.fixture(scope="module")
def small() -> pgp.NewKey:
    return pgp.new_key("small", key_length=2048)


def test_inspect_public_key_refuses_rsa_under_4096_bits(small: pgp.NewKey) -> None:
    info = pgp.inspect_public_key(small.public_key)
    assert info.fingerprint == small.fingerprint
    assert any("4096" in problem for problem in info.problems)


def test_inspect_public_key_refuses_what_is_not_one_key(small: pgp.NewKey) -> None:
    assert pgp.inspect_public_key("not a key").problems
    assert pgp.inspect_public_key(small.public_key * 2).fingerprint == small.fingerprint
    other = pgp.new_key("other", key_length=1024)
    assert pgp.inspect_public_key(small.public_key + other.public_key).fingerprint == ""


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_sweep_stale_homes_removes_only_homes_of_dead_processes(tmp_path: Path) -> None:
    dead = tmp_path / "cv-gpg-dead"
    alive = tmp_path / "cv-gpg-alive"
    unowned = tmp_path / "cv-gpg-new"
    other = tmp_path / "not-ours"
    for home in (dead, alive, unowned, other):
        home.mkdir(mode=0o700)
        (home / "private-keys-v1.d").mkdir()
    (dead / "owner.pid").write_text(str(dead_pid()))
    (alive / "owner.pid").write_text(str(os.getppid()))
    (other / "owner.pid").write_text(str(dead_pid()))
    assert pgp.sweep_stale_homes(tmp_path) == 1
    assert not dead.exists()
    assert alive.exists() and unowned.exists() and other.exists()


def test_a_home_in_use_names_its_owner_and_is_gone_after() -> None:
    with pgp._home() as gpg:
        home = Path(gpg.gnupghome)
        assert (home / "owner.pid").read_text() == str(os.getpid())
        assert home.exists()
    assert not home.exists()
