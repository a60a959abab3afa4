"""The vault's side of bulk import (docs/migration.md): the import key, uploads, runs.

A run of one file into one account and mode, in one admin request whose answer is a
stream of JSON lines (progress, refused rows, the summary):

1. **Upload.** The command line sends the file (always an OpenPGP message to the
   vault's import key: a plain test file is encrypted by the command line first) in
   parts of at most :data:`PART_BYTES`, appended to a spool file of the vault's
   (ciphertext only; removed when the run ends).
2. **Check pass.** The spool is decrypted (streamed, :mod:`.pgp`) and read
   (:mod:`.reader`) through to the end without importing anything: a file that fails
   authentication at its end (truncated, altered), whose structure is broken, or that
   names an external id twice is refused here whole, so nothing of it is imported.
3. **Import pass.** Decrypted and read again; the rows after the job's cursor go in
   batches: each row is checked, fingerprinted and sealed exactly as ``POST
   /v1/payment_methods`` would (:meth:`PaymentMethods.prepare_import`), refused rows
   are reported (reason; the number masked), then the batch's ``import.batch`` audit
   record is written and the batch is stored in one transaction with the job's cursor
   (:meth:`VaultStore.write_import_batch`): a batch is all there or not at all.

**Pipelined** (:mod:`.batches`): one batch is stored while the next is prepared, with
the order of records and rows of a sequential run.

Idempotent: the job's id derives from the account, the mode and the file's SHA-256, so
the same file resumes its job at the cursor (a run cut off loses at most a batch, done
again), and a finished job does nothing. An external id names one card per account and
mode: met again with the same card (another file, say), the row counts as already
imported; with another card it is refused (``external_id_taken``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import secrets
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from cardvault import crypto, pgp
from cardvault.audit.recorder import Recorder
from cardvault.errors import CardVaultError, ImportRefused, InvalidRequestError, ResourceMissing
from cardvault.logging import get_logger
from cardvault.storage.base import (
    DuplicateError,
    ImportJob,
    ImportKeyRecord,
    VaultStore,
)
from cardvault.vault.accounts import Caller
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.imports.batches import ImportBatches, Storing
from cardvault.vault.imports.reader import (
    DEFAULT_IMPORT_LIMITS,
    FIELDS,
    FORMATS,
    ImportFileError,
    ImportLimits,
    Row,
    RowReader,
)
from cardvault.vault.payment_methods import PaymentMethods

__all__ = ["MAX_BATCH", "PART_BYTES", "Imports", "job_id_for", "parse_run_request"]

_log = get_logger("cardvault.vault")

#: The most bytes one upload part carries (the admin listener's body limit is 1 MiB).
PART_BYTES = 512 * 1024
MAX_BATCH = 1000
#: Plaintext chunks in flight between gpg's reader thread and the event loop.
_QUEUE = 8
#: An upload untouched this long is removed at the next upload.
_UPLOAD_TTL_S = 24 * 3600
_UPLOAD_PREFIX = "upl_"
#: The check pass's buckets of external-id hashes (by the hash's first byte).
_ID_BUCKETS = 256


def job_id_for(account_id: str, mode: str, sha256: str) -> str:
    digest = hashlib.sha256(f"{account_id}\0{mode}\0{sha256}".encode()).hexdigest()
    return "imp_" + digest[:24]


def _key_context(fingerprint: str) -> dict[str, str]:
    return {"object": "import_key", "fingerprint": fingerprint, "field": "passphrase"}


class Imports:
    """Bulk import (module docstring)."""

    def __init__(
        self,
        store: VaultStore,
        payment_methods: PaymentMethods,
        keys: DataKeyManager,
        audit: Recorder,
        *,
        spool: Path,
        max_upload_bytes: int = 64 * 1024**3,
        limits: ImportLimits = DEFAULT_IMPORT_LIMITS,
    ) -> None:
        self.store = store
        self.payment_methods = payment_methods
        self.keys = keys
        self.audit = audit
        self.spool = Path(spool)
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits
        self.batches = ImportBatches(store, payment_methods, audit)
        self._running: set[str] = set()

    # -- the import key ------------------------------------------------------------------

    async def create_key(self, actor: str) -> dict[str, Any]:
        """A new import key: files are decrypted with the newest one from now on (the
        older ones stay stored, unused; docs/migration.md, "The key ceremony")."""
        made = await asyncio.to_thread(pgp.new_key, "cardvault import")
        dk_id, dk = await self.keys.for_encryption("pan")
        sealed = crypto.seal(dk, made.passphrase.encode(), _key_context(made.fingerprint))
        record = ImportKeyRecord(
            made.fingerprint, made.public_key, made.secret_key, dk_id, sealed, int(time.time())
        )
        # The OpenPGP key id (the fingerprint's last 16 hex digits): the audit log
        # refuses longer hex strings, which look like key material.
        await self.audit.record(
            "import.key_created", actor=actor, object_id=f"pgp_{made.fingerprint[-16:]}"
        )
        await self.store.put_import_key(record)
        return self._key_object(record)

    async def public_key(self) -> dict[str, Any]:
        record = await self.store.get_import_key()
        if record is None:
            raise ResourceMissing("No import key: make one with `cardvault import-key create`.")
        return self._key_object(record)

    @staticmethod
    def _key_object(record: ImportKeyRecord) -> dict[str, Any]:
        return {
            "object": "import_key",
            "fingerprint": record.fingerprint,
            "public_key": record.public_key,
            "created": record.created,
        }

    async def _secret(self) -> tuple[ImportKeyRecord, str]:
        record = await self.store.get_import_key()
        if record is None:
            raise ResourceMissing("No import key: make one with `cardvault import-key create`.")
        dk = await self.keys.for_decryption(record.data_key_id, "pan")
        passphrase = crypto.open_(dk, record.sealed_passphrase, _key_context(record.fingerprint))
        return record, passphrase.decode()

    # -- uploads -------------------------------------------------------------------------

    def _upload_path(self, upload_id: str) -> Path:
        body = upload_id.removeprefix(_UPLOAD_PREFIX)
        if not upload_id.startswith(_UPLOAD_PREFIX) or not (body.isalnum() and len(body) == 32):
            raise ResourceMissing("No such upload.", param="upload")
        return self.spool / f"{upload_id}.pgp"

    async def new_upload(self) -> dict[str, Any]:
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = time.time()
        for old in self.spool.glob(f"{_UPLOAD_PREFIX}*.pgp"):
            with contextlib.suppress(OSError):
                if now - old.stat().st_mtime > _UPLOAD_TTL_S:
                    old.unlink()
        upload_id = _UPLOAD_PREFIX + secrets.token_hex(16)
        fd = os.open(self._upload_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return {"object": "import_upload", "id": upload_id, "size": 0}

    async def append(self, upload_id: str, offset: int, data: bytes) -> dict[str, Any]:
        """Append ``data`` at ``offset``, which must be the upload's size so far (a part
        sent again after a lost answer is then refused, and the answer says where to
        go on)."""
        path = self._upload_path(upload_id)
        if not path.exists():
            raise ResourceMissing("No such upload.", param="upload")
        size = path.stat().st_size
        if offset != size:
            raise ImportRefused(
                "offset_mismatch", f"offset must be the upload's size, {size}.", param="offset"
            )
        if size + len(data) > self.max_upload_bytes:
            raise InvalidRequestError("The upload is larger than allowed.", param="upload")
        with path.open("ab") as fh:
            fh.write(data)
        return {"object": "import_upload", "id": upload_id, "size": size + len(data)}

    # -- runs ----------------------------------------------------------------------------

    async def run(self, actor: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Check, then import, the upload named by ``request`` (see docs/migration.md);
        yields the events of the run. Errors before the check pass ends are raised
        (nothing was imported); later ones end the stream with an ``error`` event."""
        account_id, mode, fmt = request["account"], request["mode"], request["format"]
        livemode = mode == "live"
        if request["plain"] and livemode:
            raise InvalidRequestError(
                "Plain files are for test mode only: encrypt a live file to the import key.",
                param="plain",
            )
        if await self.store.get_account(account_id) is None:
            raise ResourceMissing("No such account.", param="account")
        source = self._upload_path(request["upload"])
        if not source.exists():
            raise ResourceMissing("No such upload.", param="upload")
        job_id = job_id_for(account_id, mode, request["sha256"])
        if job_id in self._running:
            raise ImportRefused("import_running", "This file is being imported already.")
        self._running.add(job_id)
        try:
            async for event in self._run(actor, request, job_id, source, fmt, livemode):
                yield event
        finally:
            self._running.discard(job_id)

    async def _run(
        self,
        actor: str,
        request: dict[str, Any],
        job_id: str,
        source: Path,
        fmt: Any,
        livemode: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        sha256 = request["sha256"]
        if not request["plain"] and await asyncio.to_thread(_file_sha256, source) != sha256:
            raise InvalidRequestError("The upload does not have this SHA-256.", param="sha256")
        key, passphrase = await self._secret()
        job = await self.store.get_import_job(job_id)
        if job is not None and job.finished is not None:
            source.unlink(missing_ok=True)
            yield {"event": "done", **_job_object(job)}
            return
        started = time.monotonic()
        total, ignored = await self._check(key, passphrase, source, request)
        yield {"event": "checked", "job": job_id, "rows": total, "ignored_columns": ignored,
               "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
        now = int(time.time())
        if job is None:
            job = ImportJob(job_id, request["account"], livemode, sha256, fmt, total,
                            0, 0, 0, 0, 0, {}, now, now)  # fmt: skip
            await self.audit.record(
                "import.started",
                actor=actor,
                object_id=job_id,
                detail={"account": job.account_id, "livemode": livemode, "rows": total,
                        "format": fmt, "plain": bool(request["plain"])},
            )  # fmt: skip
            await self.store.put_import_job(job)
        caller = Caller(job.account_id, "live" if livemode else "test", "secret", actor)
        resume_after = job.cursor
        batch: list[Row] = []
        # One batch is stored while the next is prepared (:mod:`.batches`).
        storing: Storing | None = None
        try:
            async for rows in self._rows(key, passphrase, source, request):
                for row in rows:
                    if row.number <= resume_after:
                        continue
                    batch.append(row)
                    if len(batch) >= request["batch_size"]:
                        prepared = await self.batches.prepare(caller, job, batch, storing)
                        batch = []
                        stored = None if storing is None else await storing.done()
                        job = prepared.batch.job
                        storing = self.batches.start_storing(actor, prepared)
                        if stored is not None:
                            yield stored
            if batch:
                prepared = await self.batches.prepare(caller, job, batch, storing)
                stored = None if storing is None else await storing.done()
                job = prepared.batch.job
                storing = self.batches.start_storing(actor, prepared)
                if stored is not None:
                    yield stored
            if storing is not None:
                stored = await storing.done()
                storing = None
                yield stored
        except (ImportFileError, pgp.PgpError, DuplicateError, CardVaultError) as exc:
            # The file passed its check, so this is a file changed meanwhile or a
            # concurrent import of the same ids: the batches stored stay, whole. The
            # batch in flight is reported first if it was stored (nothing if it is the
            # one that failed).
            if storing is not None:
                stored, storing = await storing.outcome(), None
                if stored is not None:
                    yield stored
            yield {"event": "error", "code": getattr(exc, "code", "duplicate"),
                   "message": str(getattr(exc, "message", "a row of the batch is taken"))}  # fmt: skip
            return
        finally:
            if storing is not None:
                # Stopped with a batch in flight (an error, the client gone): it is
                # stored whole or not at all; wait for it, so that a run started again
                # finds the job's cursor settled.
                await storing.settle()
        job = replace(job, finished=int(time.time()), updated=int(time.time()))
        await self.audit.record(
            "import.completed",
            actor=actor,
            object_id=job.id,
            detail={"imported": job.imported, "invalid": job.invalid,
                    "duplicates": job.duplicates, "already": job.already},
        )  # fmt: skip
        await self.store.put_import_job(job)
        source.unlink(missing_ok=True)
        yield {"event": "done", **_job_object(job)}

    async def _chunks(
        self, key: ImportKeyRecord, passphrase: str, source: Path
    ) -> AsyncIterator[bytes]:
        """The plaintext of ``source``, streamed from gpg's reader thread with
        backpressure (at most ``_QUEUE`` chunks held); a :class:`pgp.PgpError` after
        the last chunk when the file fails authentication."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)
        stop = False

        def on_chunk(chunk: bytes) -> bool:
            if stop:
                return False
            asyncio.run_coroutine_threadsafe(queue.put(chunk or None), loop).result()
            return not stop

        task = asyncio.ensure_future(
            asyncio.to_thread(pgp.decrypt, key.secret_key, passphrase, source, on_chunk)
        )
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                chunk = getter.result()
                if chunk is None:
                    break
                yield chunk
            await task  # raises PgpError when the message failed authentication
        finally:
            stop = True
            while not queue.empty():
                queue.get_nowait()
            if not task.done():
                # Unblock a reader thread waiting to put, then let gpg finish.
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)

    async def _rows(
        self, key: ImportKeyRecord, passphrase: str, source: Path, request: dict[str, Any]
    ) -> AsyncIterator[list[Row]]:
        reader = RowReader(request["format"], columns=request["columns"], limits=self.limits)
        async for chunk in self._chunks(key, passphrase, source):
            rows = reader.feed(chunk)
            if rows:
                yield rows
        rows = reader.close()
        if rows:
            yield rows

    async def _check(
        self, key: ImportKeyRecord, passphrase: str, source: Path, request: dict[str, Any]
    ) -> tuple[int, list[str]]:
        """The check pass (module docstring): the file's rows, read through to the
        end; raises :class:`InvalidRequestError` for a file to refuse whole."""
        reader = RowReader(request["format"], columns=request["columns"], limits=self.limits)
        # External ids, as 8 bytes of a keyed hash each (8 bytes a row, whatever the
        # ids' length), and the lines they are on, for finding any id given twice; in
        # buckets by the hash's first byte, so that the sort below holds the Python
        # objects of one bucket at a time (a sort of them all held ~100 MiB for 1M rows).
        salt = secrets.token_bytes(16)
        hashes: list[array[int]] = [array("Q") for _ in range(_ID_BUCKETS)]
        lines: list[array[int]] = [array("Q") for _ in range(_ID_BUCKETS)]
        plain = hashlib.sha256()

        def note(found: list[Row]) -> None:
            for row in found:
                value = _id_hash(salt, row.external_id)
                bucket = value >> 56
                hashes[bucket].append(value)
                lines[bucket].append(row.line)

        try:
            async for chunk in self._chunks(key, passphrase, source):
                plain.update(chunk)
                note(reader.feed(chunk))
            note(reader.close())
        except ImportFileError as exc:
            raise ImportRefused(
                exc.code,
                f"The file was refused whole, nothing imported: {exc.message}.",
                param="file",
            ) from None
        except pgp.PgpError as exc:
            raise ImportRefused(
                exc.code,
                f"The file was refused whole, nothing imported: {exc.message}.",
                param="file",
            ) from None
        if request["plain"] and plain.hexdigest() != request["sha256"]:
            raise InvalidRequestError("The file does not have this SHA-256.", param="sha256")
        for bucket_hashes, bucket_lines in zip(hashes, lines, strict=True):
            order = sorted(range(len(bucket_hashes)), key=bucket_hashes.__getitem__)
            for before, after in itertools.pairwise(order):
                if bucket_hashes[before] == bucket_hashes[after]:
                    first, second = sorted((bucket_lines[before], bucket_lines[after]))
                    raise ImportRefused(
                        "duplicate_external_id",
                        f"The file was refused whole, nothing imported: line {second} "
                        f"repeats the external id of line {first}.",
                        param="file",
                    )
        return sum(len(b) for b in hashes), reader.ignored_columns

    async def job(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get_import_job(job_id)
        if job is None:
            raise ResourceMissing("No such import.", param="job")
        return _job_object(job)

    async def rows(self, job_id: str, after: int, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= 10_000 or after < 0:
            raise InvalidRequestError("limit is 1 to 10000, after at least 0.", param="limit")
        found = await self.store.import_rows(job_id, after, limit)
        return {
            "object": "list",
            "data": [
                {"row": r.row_number, "line": r.line, "external_id": r.external_id,
                 "payment_method": r.pm_id, "reason": r.reason, "detail": r.detail}
                for r in found
            ],
            "has_more": len(found) == limit,
        }  # fmt: skip


def _id_hash(salt: bytes, external_id: str) -> int:
    digest = hashlib.blake2b(external_id.encode(), key=salt, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _job_object(job: ImportJob) -> dict[str, Any]:
    return {
        "object": "import",
        "id": job.id,
        "account": job.account_id,
        "livemode": job.livemode,
        "file_sha256": job.file_sha256,
        "format": job.format,
        "rows": job.total_rows,
        "done": job.cursor,
        "imported": job.imported,
        "duplicates_by_fingerprint": job.duplicates,
        "already_imported": job.already,
        "invalid": job.invalid,
        "invalid_by_reason": job.reasons,
        "started": job.started,
        "finished": job.finished,
    }


def parse_run_request(body: dict[str, Any]) -> dict[str, Any]:
    """A run's parameters (``POST /v1/admin/imports``), each checked and bounded."""
    allowed = {"account", "mode", "format", "columns", "upload", "sha256", "plain", "batch_size"}
    for name in body:
        if name not in allowed:
            raise InvalidRequestError(f"Unknown parameter: {str(name)[:64]}.", param="body")
    account = body.get("account")
    if not isinstance(account, str) or not account.startswith("acct_") or len(account) > 64:
        raise InvalidRequestError("account must be an account id (acct_…).", param="account")
    mode = body.get("mode", "test")
    if mode not in ("test", "live"):
        raise InvalidRequestError("mode is test or live.", param="mode")
    fmt = body.get("format", "jsonl")
    if fmt not in FORMATS:
        raise InvalidRequestError("format is jsonl or csv.", param="format")
    columns = body.get("columns") or {}
    if not isinstance(columns, dict) or len(columns) > 64:
        raise InvalidRequestError("columns maps at most 64 columns.", param="columns")
    for column, field in columns.items():
        if (
            not isinstance(field, str)
            or not (field in FIELDS or (field.startswith("metadata.") and 9 < len(field) <= 49))
            or len(column) > 128
        ):
            raise InvalidRequestError(
                "columns maps a column name (at most 128 characters) to a field: "
                + ", ".join(FIELDS)
                + " or metadata.<key>.",
                param="columns",
            )
    upload = body.get("upload")
    if not isinstance(upload, str) or len(upload) > 64:
        raise InvalidRequestError("upload must be an upload id.", param="upload")
    sha256 = body.get("sha256")
    if (
        not isinstance(sha256, str)
        or len(sha256) != 64
        or not all(c in "0123456789abcdef" for c in sha256)
    ):
        raise InvalidRequestError("sha256 is the file's SHA-256, in lowercase hex.", param="sha256")
    plain = body.get("plain", False)
    if not isinstance(plain, bool):
        raise InvalidRequestError("plain is true or false.", param="plain")
    size = body.get("batch_size", 500)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_BATCH:
        raise InvalidRequestError(f"batch_size is 1 to {MAX_BATCH}.", param="batch_size")
    return {"account": account, "mode": mode, "format": fmt, "columns": columns,
            "upload": upload, "sha256": sha256, "plain": plain, "batch_size": size}  # fmt: skip
