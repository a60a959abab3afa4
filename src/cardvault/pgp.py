"""OpenPGP for bulk import and export, by python-gnupg driving Debian's ``gpg`` (docs/migration.md
says why this library).

Every operation runs ``gpg`` in a home directory of its own, made for the call (mode
0700) and deleted after it, with its agent stopped: nothing of a key stays on the host
beyond the call. The import key's secret half is only ever on disk protected by its
passphrase (gpg's own key protection), in the vault's database and in that directory;
the passphrase is given to ``gpg`` on a pipe, never on a command line or in a file.

Decryption is streamed: gpg reads the file (ciphertext) and writes the plaintext to a
pipe, which :func:`decrypt` hands to ``on_chunk`` as it comes, never to a file, and
never whole. gpg authenticates the message (its MDC or AEAD tag) only at its end, so a
caller that must not act on a truncated or altered file reads it through once before
acting (:mod:`cardvault.vault.imports.service` does).

A top-level module with no ``cardvault`` imports, so that the vault and the command
line (which encrypts a plain test file to the vault's key before sending it) share it.

Signatures are not asked for: anyone may encrypt to the vault's public key, so a file
proves nothing about its sender either way; the operator's admin certificate is what
authorises an import.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gnupg

__all__ = [
    "GPG_BINARY",
    "MIN_RSA_BITS",
    "NewKey",
    "PgpError",
    "PublicKeyInfo",
    "decrypt",
    "encrypt",
    "encrypt_stream",
    "inspect_public_key",
    "new_key",
    "sweep_stale_homes",
]

GPG_BINARY = "gpg"
#: Bytes read from gpg's output at a time. Larger reads cost fewer hand-overs between
#: gpg's reader thread and the event loop.
_READ = 64 * 1024
#: The smallest RSA key a card export may be encrypted to: what Stripe's and processors'
#: migration teams require of a key that card data is sent to.
MIN_RSA_BITS = 4096
#: OpenPGP public-key algorithm ids of RSA (RFC 4880 9.1: encrypt-or-sign, encrypt-only).
_RSA_ALGOS = {"1", "2"}


class PgpError(Exception):
    """A PGP operation failed: ``code`` says how (``wrong_key``, ``corrupt``,
    ``not_pgp``, ``gpg_failed``). The message holds no data of the file."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class NewKey:
    fingerprint: str
    public_key: str
    #: Armored, protected by ``passphrase``.
    secret_key: str
    passphrase: str


_HOME_PREFIX = "cv-gpg-"
_OWNER = "owner.pid"


def _kill_agent(home: str) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
        capture_output=True,
        check=False,
        timeout=10,
    )


@contextlib.contextmanager
def _home() -> Iterator[gnupg.GPG]:
    home = tempfile.mkdtemp(prefix=_HOME_PREFIX)  # mode 0700
    try:
        # Whose home this is, for sweep_stale_homes: a process killed outright
        # (SIGKILL, a crash) leaves its home behind, with the import key's secret half
        # (passphrase-protected) and a gpg-agent that may hold it unlocked.
        Path(home, _OWNER).write_text(str(os.getpid()))
        gpg = gnupg.GPG(gpgbinary=GPG_BINARY, gnupghome=home)
        gpg.encoding = "utf-8"
        gpg.buffer_size = _READ
        yield gpg
    finally:
        # The agent gpg started for this home holds the unlocked key in memory.
        _kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def sweep_stale_homes(directory: Path | None = None) -> int:
    """Remove the home directories of processes that no longer run (killed while they
    used gpg), stopping their agents first; the count removed. Homes of live
    processes (another worker's run in progress) are left alone. The vault calls it at
    start."""
    removed = 0
    for home in Path(directory or tempfile.gettempdir()).glob(f"{_HOME_PREFIX}*"):
        try:
            if not home.is_dir() or home.is_symlink() or home.stat().st_uid != os.getuid():
                continue
            owner = int(home.joinpath(_OWNER).read_text().strip() or "0")
        except (OSError, ValueError):
            continue  # not ours, or being made right now
        if owner <= 0 or owner == os.getpid():
            continue
        try:
            os.kill(owner, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_agent(str(home))
        shutil.rmtree(home, ignore_errors=True)
        removed += 1
    return removed


def new_key(name: str, *, key_length: int = 4096) -> NewKey:
    """A new RSA key pair (certify/sign key and an encryption subkey of ``key_length``
    bits; Stripe and processors expect RSA of at least 4096), its secret half protected
    by a new random passphrase."""
    passphrase = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    with _home() as gpg:
        spec = gpg.gen_key_input(
            key_type="RSA",
            key_length=key_length,
            key_usage="sign",
            subkey_type="RSA",
            subkey_length=key_length,
            subkey_usage="encrypt",
            name_real=name,
            name_email="import@cardvault.invalid",
            expire_date=0,
            passphrase=passphrase,
        )
        made = gpg.gen_key(spec)
        fingerprint = str(made.fingerprint or "")
        if not fingerprint:
            raise PgpError("gpg_failed", "gpg could not make the key")
        public = gpg.export_keys(fingerprint)
        secret = gpg.export_keys(fingerprint, secret=True, passphrase=passphrase)
    if not public or not secret:
        raise PgpError("gpg_failed", "gpg could not export the key")
    return NewKey(fingerprint, str(public), str(secret), passphrase)


def decrypt(
    secret_key: str, passphrase: str, source: Path, on_chunk: Callable[[bytes], bool]
) -> None:
    """Decrypt the file ``source`` with ``secret_key``, handing the plaintext to
    ``on_chunk`` as it comes (an empty chunk at the end); once ``on_chunk`` answers
    False, the rest is read and dropped. Raises :class:`PgpError` when the file is not
    a message to this key or fails authentication: the caller must then discard
    whatever it was handed."""
    with _home() as gpg:
        imported = gpg.import_keys(secret_key, passphrase=passphrase)
        if not imported.fingerprints:
            raise PgpError("gpg_failed", "gpg could not load the import key")
        wanted = True

        def take(chunk: bytes) -> bool:
            nonlocal wanted
            if wanted:
                wanted = on_chunk(chunk)
            return False  # never buffered by python-gnupg: memory stays flat

        gpg.on_data = take
        result = gpg.decrypt_file(
            str(source),
            passphrase=passphrase,
            # A message without integrity protection is refused (gpg's default in 2.2
            # too; said here so that a changed default cannot let one through).
            extra_args=["--force-mdc", "--no-auto-key-retrieve"],
        )
    failure = getattr(result, "on_data_failure", None)
    if failure is not None:
        raise failure
    if not result.ok:
        raise _failure(str(result.status or ""), str(result.stderr or ""))


def _failure(status: str, stderr: str) -> PgpError:
    text = f"{status}\n{stderr}".lower()
    if "no_seckey" in text or "no secret key" in text:
        return PgpError("wrong_key", "the file is not encrypted to the vault's import key")
    if "decryption_key" in text or "begin_decryption" in text:
        # Addressed to this key, then broken: truncated or altered.
        return PgpError("corrupt", "the file failed decryption: it is truncated or altered")
    if "no valid openpgp data" in text or "nodata" in text:
        return PgpError("not_pgp", "the file is not an OpenPGP message")
    return PgpError("corrupt", "the file failed decryption")


def encrypt(
    public_key: str, fingerprint: str, source: Path, on_chunk: Callable[[bytes], object]
) -> None:
    """Encrypt the file ``source`` to ``public_key`` (whose fingerprint must be
    ``fingerprint``), handing the ciphertext to ``on_chunk`` as it comes. For the
    command line's plain test files and for tests."""
    with source.open("rb") as fh:
        encrypt_stream(public_key, fingerprint, fh, on_chunk)


@dataclass(frozen=True)
class PublicKeyInfo:
    """What :func:`inspect_public_key` found: the primary key's fingerprint, and each
    problem that makes the key unfit for a card export (empty when it is fit)."""

    fingerprint: str
    problems: tuple[str, ...]


def inspect_public_key(public_key: str) -> PublicKeyInfo:
    """The fingerprint of the one public key in ``public_key`` (armored or binary
    text), and why it may not receive a card export: not exactly one key, a primary key
    or an encryption subkey that is not RSA of at least :data:`MIN_RSA_BITS` bits, no
    usable encryption subkey, a revoked or expired key."""
    with _home() as gpg:
        imported = gpg.import_keys(public_key)
        keys = gpg.list_keys()
    fingerprints = list(dict.fromkeys(imported.fingerprints or []))
    if len(fingerprints) != 1 or len(keys) != 1:
        return PublicKeyInfo("", ("the file must hold exactly one public key",))
    key = keys[0]
    problems: list[str] = []
    if key.get("trust") in ("r", "e", "i", "d"):
        problems.append("the key is revoked, expired or invalid")
    if key.get("algo") not in _RSA_ALGOS or int(key.get("length") or 0) < MIN_RSA_BITS:
        problems.append(f"the primary key is not RSA of at least {MIN_RSA_BITS} bits")
    usable = 0
    for sub in (key.get("subkey_info") or {}).values():
        if "e" not in str(sub.get("cap", "")).lower():
            continue
        if sub.get("trust") in ("r", "e", "i", "d"):
            continue
        if sub.get("algo") not in _RSA_ALGOS or int(sub.get("length") or 0) < MIN_RSA_BITS:
            problems.append(f"an encryption subkey is not RSA of at least {MIN_RSA_BITS} bits")
        usable += 1
    if usable == 0 and "e" not in str(key.get("cap", "")):
        problems.append("the key has no usable encryption key")
    return PublicKeyInfo(str(key["fingerprint"]), tuple(problems))


def encrypt_stream(
    public_key: str, fingerprint: str, source: BinaryIO, on_chunk: Callable[[bytes], object]
) -> None:
    """Encrypt what is read from ``source`` (a file, or the read end of a pipe: the
    vault's card export never has its plaintext on a disk) to ``public_key``, whose
    fingerprint must be ``fingerprint``, handing the ciphertext to ``on_chunk`` as it
    comes. Runs until ``source`` ends."""
    with _home() as gpg:
        imported = gpg.import_keys(public_key)
        if fingerprint not in (imported.fingerprints or []):
            raise PgpError("wrong_key", "the public key does not have the expected fingerprint")

        def take(chunk: bytes) -> bool:
            if chunk:
                on_chunk(chunk)
            return False

        gpg.on_data = take
        result = gpg.encrypt_file(
            source, [fingerprint], armor=False, always_trust=True, extra_args=["--force-mdc"]
        )
    if not result.ok:
        raise PgpError("gpg_failed", "gpg could not encrypt the file")
