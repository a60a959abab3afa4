"""The import pass (cardvault.vault.imports.service and .batches): one batch is stored while the next
is prepared, and that changes nothing a run can see. A batch whose write fails stops the
run with the batches before it stored whole, its audit record followed by
``import.batch_not_stored`` and no record for a later batch; the same file run again
resumes after the last stored batch and imports every row once. Duplicates by
fingerprint are counted across the batch still being stored."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cardvault import crypto, pgp
from cardvault.audit.recorder import Recorder
from cardvault.errors import ImportRefused
from cardvault.storage import SQLiteVaultStore, StoreUnavailable
from cardvault.storage._shared import CONNECTION_LOST
from cardvault.storage.base import Account, ImportBatch, ImportKeyRecord
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.imports import Imports
from cardvault.vault.payment_methods import PaymentMethods

from .test_datakeys import FakeKeyService

ACCT = "acct_import1"
#: Published test cards (src/cardvault/cards/test_cards.json).
CARDS = ("4242424242424242", "5555555555554444", "4000056655665556")


class ListLog:
    """An audit log that keeps the actions recorded, in order."""

    def __init__(self) -> None:
        self.actions: list[str] = []

    async def append(self, action: str, **_: Any) -> None:
        self.actions.append(action)


class FailingStore(SQLiteVaultStore):
    """Fails the n-th batch write (from 1) once, after an optional pause that lets the
    next batch be prepared meanwhile."""

    fail_at = 0

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0

    async def write_import_batch(self, batch: ImportBatch) -> None:
        self.writes += 1
        await asyncio.sleep(0.01)
        if self.writes == self.fail_at:
            raise StoreUnavailable(CONNECTION_LOST)
        await super().write_import_batch(batch)


def plain(rows: int) -> bytes:
    return b"".join(
        json.dumps(
            {"id": f"ext_{i}", "number": CARDS[i % len(CARDS)], "exp_month": 1 + i % 12,
             "exp_year": 2034, "name": f"Holder {i}"}
        ).encode() + b"\n"
        for i in range(rows)
    )  # fmt: skip


async def make(tmp_path: Path, store: SQLiteVaultStore) -> tuple[Imports, ListLog]:
    await store.migrate()
    await store.create_account(Account(ACCT, "Import shop", 1))
    log = ListLog()
    audit = Recorder(log)  # type: ignore[arg-type]
    keys = DataKeyManager(store, FakeKeyService())  # type: ignore[arg-type]
    imports = Imports(store, PaymentMethods(store, keys), keys, audit, spool=tmp_path / "spool")
    # An import key whose passphrase opens as the vault's would (no gpg needed: the
    # decryption is replaced by the plaintext below).
    fingerprint = "AB" * 20
    dk_id, dk = await keys.for_encryption("pan")
    sealed = crypto.seal(
        dk, b"passphrase", {"object": "import_key", "fingerprint": fingerprint,
                            "field": "passphrase"}
    )  # fmt: skip
    await store.put_import_key(ImportKeyRecord(fingerprint, "pub", "sec", dk_id, sealed, 1))
    return imports, log


def decrypting(data: bytes) -> Callable[..., None]:
    def decrypt(secret: str, passphrase: str, source: Path, on_chunk: Callable[..., Any]) -> None:
        for at in range(0, len(data), 4096):
            if not on_chunk(data[at : at + 4096]):
                return
        on_chunk(b"")

    return decrypt


async def run(imports: Imports, data: bytes, batch_size: int) -> list[dict[str, Any]]:
    upload = await imports.new_upload()
    await imports.append(upload["id"], 0, b"ciphertext")
    request = {"account": ACCT, "mode": "test", "format": "jsonl", "columns": {},
               "upload": upload["id"], "sha256": hashlib.sha256(data).hexdigest(),
               "plain": True, "batch_size": batch_size}  # fmt: skip
    return [event async for event in imports.run("admin", request)]


def test_a_failed_batch_write_stops_the_run_and_the_run_again_resumes_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = plain(95)
    monkeypatch.setattr(pgp, "decrypt", decrypting(data))

    async def main() -> None:
        store = FailingStore(tmp_path / "vault.db")
        store.fail_at = 3
        imports, log = await make(tmp_path, store)
        try:
            first = await run(imports, data, 20)
            kinds = [e["event"] for e in first]
            assert kinds == ["checked", "batch", "batch", "error"]
            assert [e["done"] for e in first if e["event"] == "batch"] == [20, 40]
            # The failed batch's record, then its follow-up; the batch prepared while
            # it was being stored was never recorded.
            assert log.actions == ["import.started", "import.batch", "import.batch",
                                   "import.batch", "import.batch_not_stored"]  # fmt: skip
            job = await store.get_import_job(first[0]["job"])
            assert job is not None and job.cursor == 40 and job.imported == 40

            again = await run(imports, data, 20)
            assert again[-1]["event"] == "done"
            assert [e["done"] for e in again if e["event"] == "batch"] == [60, 80, 95]
            assert again[-1]["imported"] == 95
            assert again[-1]["already_imported"] == 0
            # Three cards in all: every row after the first three repeats one, across
            # batch boundaries and the batch still being stored.
            assert again[-1]["duplicates_by_fingerprint"] == 95 - len(CARDS)
            rows = await imports.rows(first[0]["job"], 0, 1000)
            assert [r["row"] for r in rows["data"]] == list(range(1, 96))
            assert len({r["payment_method"] for r in rows["data"]}) == 95
            assert log.actions.count("import.batch") == 3 + 3
            assert log.actions[-1] == "import.completed"
        finally:
            await store.close()

    asyncio.run(main())


def test_batches_of_one_count_duplicates_and_refusals_as_one_batch_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = plain(12).splitlines(keepends=True)
    rows[3] = rows[3].replace(b"4242424242424242", b"4242424242424241")  # fails Luhn
    data = b"".join(rows)
    monkeypatch.setattr(pgp, "decrypt", decrypting(data))

    async def main() -> list[dict[str, Any]]:
        outcomes = []
        for size in (1, 1000):
            store = FailingStore(tmp_path / f"vault{size}.db")
            imports, _ = await make(tmp_path / str(size), store)
            try:
                outcomes.append((await run(imports, data, size))[-1])
            finally:
                await store.close()
        return outcomes

    one, whole = asyncio.run(main())
    for key in ("imported", "invalid", "duplicates_by_fingerprint", "invalid_by_reason"):
        assert one[key] == whole[key], key
    assert whole["imported"] == 11
    assert whole["duplicates_by_fingerprint"] == 11 - len(CARDS)


@pytest.mark.parametrize("rows", [2, 5000])
def test_an_external_id_given_twice_refuses_the_file_naming_both_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    lines = plain(rows).splitlines(keepends=True)
    lines.append(lines[rows // 2].replace(b"Holder", b"Other"))  # the id of line rows/2 + 1
    data = b"".join(lines)
    monkeypatch.setattr(pgp, "decrypt", decrypting(data))

    async def main() -> None:
        store = FailingStore(tmp_path / "vault.db")
        imports, log = await make(tmp_path, store)
        try:
            with pytest.raises(ImportRefused) as refused:
                await run(imports, data, 1000)
            assert refused.value.reason == "duplicate_external_id"
            assert f"line {rows + 1} repeats the external id of line {rows // 2 + 1}" in str(
                refused.value.message
            )
            assert log.actions == []
        finally:
            await store.close()

    asyncio.run(main())


def test_a_batch_past_a_million_rows_is_recorded_in_the_real_audit_log(tmp_path: Path) -> None:
    """Rows 999,001 to 1,000,000 written "999001-1000000" read as a Luhn-valid card
    number, which the audit log refuses (every import of a million rows in batches of
    1,000 failed there): the record names them as two numbers."""
    from cardvault.audit import AuditLog
    from cardvault.storage.base import ImportJob
    from cardvault.vault.accounts import Caller
    from cardvault.vault.imports.reader import RowReader

    async def main() -> dict[str, Any]:
        store = SQLiteVaultStore(tmp_path / "vault.db")
        imports, _ = await make(tmp_path, store)
        log = await AuditLog.open(tmp_path / "audit")
        imports.batches.audit = Recorder(log)
        try:
            parsed = RowReader("jsonl").feed(plain(2))
            # The first and last rows of the batch (the ones between change nothing).
            rows = [
                dataclasses.replace(parsed[0], number=999_001, line=999_001),
                dataclasses.replace(parsed[1], number=1_000_000, line=1_000_000),
            ]
            job = ImportJob("imp_big", ACCT, False, "ab" * 32, "jsonl", 1_000_000,
                            999_000, 0, 0, 0, 0, {}, 1, 1)  # fmt: skip
            caller = Caller(ACCT, "test", "secret", "admin")
            prepared = await imports.batches.prepare(caller, job, rows, None)
            return await imports.batches.start_storing("admin", prepared).done()
        finally:
            await log.close()
            await store.close()

    event = asyncio.run(main())
    assert (event["done"], event["imported"]) == (1_000_000, 2)
    text = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert '"first_row":999001' in text.replace(" ", "")


def test_a_file_changed_between_the_passes_reports_the_batch_in_flight_then_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = plain(60)
    lines = good.splitlines(keepends=True)
    lines[44] = b"{not json\n"  # line 45, met while rows 21-40 are being stored
    changed = b"".join(lines)
    passes = [decrypting(good), decrypting(changed)]

    def decrypt(*args: Any) -> None:
        passes.pop(0)(*args)

    monkeypatch.setattr(pgp, "decrypt", decrypt)

    async def main() -> None:
        store = FailingStore(tmp_path / "vault.db")
        imports, log = await make(tmp_path, store)
        try:
            seen = await run(imports, good, 20)
            assert [e["event"] for e in seen] == ["checked", "batch", "batch", "error"]
            assert [e["done"] for e in seen if e["event"] == "batch"] == [20, 40]
            assert seen[-1]["code"] == "invalid_json"
            job = await store.get_import_job(seen[0]["job"])
            assert job is not None and job.cursor == 40
            assert log.actions.count("import.batch") == 2
        finally:
            await store.close()

    asyncio.run(main())
