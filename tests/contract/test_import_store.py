"""The VaultStore contract for bulk import (on SQLite and PostgreSQL, with the fixtures
of test_vault_store): a batch is written whole or not at all, external ids are unique
per account and mode, the job and the row outcomes round-trip."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cardvault.storage import DuplicateError, PostgresVaultStore, VaultStore
from cardvault.storage.base import ImportBatch, ImportJob, ImportKeyRecord, ImportLink, ImportRow
from contract.test_vault_store import ACCT, DK, NOW, OTHER, Backend, account, data_key, pm
from contract.test_vault_store import backend as backend  # the fixture, on both backends
from contract.test_vault_store import vault_postgres_dsn as vault_postgres_dsn

JOB = "imp_test1"


def job(**changes: object) -> ImportJob:
    record = ImportJob(JOB, ACCT, False, "ab" * 32, "jsonl", 0, 0, 0, 0, 0, 0, {}, NOW, NOW, None)
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def batch(first: int, count: int, *, ext: str = "cus_", **job_changes: object) -> ImportBatch:
    pms = [pm(f"pm_imp{first + i:05d}") for i in range(count)]
    links = [
        ImportLink(ACCT, False, f"{ext}{first + i}", p.id, p.fingerprint, JOB)
        for i, p in enumerate(pms)
    ]
    rows = [
        ImportRow(JOB, first + i, first + i + 1, f"{ext}{first + i}", p.id)
        for i, p in enumerate(pms)
    ]
    rows.append(
        ImportRow(JOB, first + count, first + count + 1, "cus_bad", None, "invalid_number", "x")
    )
    return ImportBatch(
        pms, links, rows, job(cursor=first + count, imported=count, invalid=1, **job_changes)
    )


async def _setup(store: VaultStore) -> None:
    await store.create_account(account())
    await store.create_account(account(OTHER))
    await store.insert_data_key(data_key())


def test_an_import_batch_is_written_whole_with_its_job(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        b = batch(1, 3, reasons={"invalid_number": 1})
        await store.write_import_batch(b)
        assert await store.get_import_job(JOB) == b.job
        for p in b.payment_methods:
            assert await store.get_payment_method(ACCT, False, p.id) == p
        links = await store.import_links(ACCT, False, ["cus_1", "cus_3", "cus_9"])
        assert sorted(k.external_id for k in links) == ["cus_1", "cus_3"]
        assert await store.import_links(ACCT, True, ["cus_1"]) == []
        assert await store.import_links(OTHER, False, ["cus_1"]) == []
        assert await store.import_rows(JOB, 0, 10) == list(b.rows)
        assert await store.import_rows(JOB, 2, 1) == [b.rows[2]]
        prints = await store.present_fingerprints(
            ACCT, False, [b.payment_methods[0].fingerprint, "nope"]
        )
        assert prints == {b.payment_methods[0].fingerprint}
        assert await store.present_fingerprints(OTHER, False, [*prints]) == set()

    backend.run(check)


def test_an_import_batch_with_a_taken_external_id_writes_nothing(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        first = batch(1, 2)
        await store.write_import_batch(first)
        # Rows 10…12, but one external id is row 1's: the whole batch is refused.
        clash = batch(10, 3)
        links = [*clash.links[:2], dataclasses.replace(clash.links[2], external_id="cus_1")]
        with pytest.raises(DuplicateError):
            await store.write_import_batch(dataclasses.replace(clash, links=links))
        for p in clash.payment_methods:
            assert await store.get_payment_method(ACCT, False, p.id) is None
        assert await store.import_rows(JOB, 2, 100) == [first.rows[2]]
        assert await store.get_import_job(JOB) == first.job

    backend.run(check)


def test_an_import_batch_with_a_taken_payment_method_id_writes_nothing(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        await store.insert_payment_method(pm("pm_imp00002"))
        with pytest.raises(DuplicateError):
            await store.write_import_batch(batch(1, 3))
        assert await store.get_payment_method(ACCT, False, "pm_imp00001") is None
        assert await store.import_links(ACCT, False, ["cus_1"]) == []
        assert await store.get_import_job(JOB) is None

    backend.run(check)


def test_the_same_external_id_may_name_cards_in_other_accounts_and_modes(
    backend: Backend,
) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        await store.write_import_batch(batch(1, 1))
        other = pm("pm_other", account_id=OTHER)
        await store.write_import_batch(
            ImportBatch(
                [other],
                [ImportLink(OTHER, False, "cus_1", other.id, other.fingerprint, "imp_other")],
                [ImportRow("imp_other", 1, 2, "cus_1", other.id)],
                job(id="imp_other", account_id=OTHER),
            )
        )
        assert [k.pm_id for k in await store.import_links(OTHER, False, ["cus_1"])] == ["pm_other"]

    backend.run(check)


def test_import_jobs_are_replaced_and_import_keys_are_newest_first(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        assert await store.get_import_key() is None
        await store.put_import_job(job(total_rows=10))
        moved = job(total_rows=10, cursor=5, reasons={"expired_card": 2}, finished=NOW + 1)
        await store.put_import_job(moved)
        assert await store.get_import_job(JOB) == moved
        old = ImportKeyRecord("AA" * 20, "pub1", "sec1", DK, b"\x01" * 40, NOW)
        new = ImportKeyRecord("BB" * 20, "pub2", "sec2", DK, b"\x02" * 40, NOW + 5)
        await store.put_import_key(new)
        await store.put_import_key(old)
        assert await store.get_import_key() == new
        with pytest.raises(DuplicateError):
            await store.put_import_key(old)

    backend.run(check)


def test_import_lookups_answer_each_value_once_among_many_batches(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await _setup(store)
        # Six batches (each with a refused row after its 100 cards).
        written = [batch(1 + 101 * n, 100, ext=f"b{n}_") for n in range(6)]
        for b in written:
            await store.write_import_batch(b)
        # Found and missing ids, one given twice, more than one lookup chunk (SQLite
        # binds 500 at a time).
        wanted = [k.external_id for b in written for k in b.links[::7]]
        wanted += [wanted[0], *(f"nobody_{i}" for i in range(600))]
        links = await store.import_links(ACCT, False, wanted)
        expected = {k.external_id: k for b in written for k in b.links if k.external_id in wanted}
        assert sorted(links, key=lambda k: k.external_id) == sorted(
            expected.values(), key=lambda k: k.external_id
        )
        assert await store.import_links(ACCT, True, wanted) == []
        prints = [p.fingerprint for b in written[2:4] for p in b.payment_methods]
        found = await store.present_fingerprints(
            ACCT, False, [*prints, prints[0], *(f"none{i}" for i in range(600))]
        )
        assert found == set(prints)
        assert await store.present_fingerprints(OTHER, False, prints) == set()

    backend.run(check)


@pytest.mark.postgres
def test_postgres_import_lookups_probe_the_index_under_a_generic_plan(
    vault_postgres_dsn: str,
) -> None:
    """A prepared statement run often gets PostgreSQL's generic plan. The lookups must
    then still probe the index once per value: a plan that reads the account's rows and
    filters them makes each batch's lookup grow with the rows imported so far."""
    import asyncpg

    from cardvault.storage.postgres import imports

    async def main() -> list[str]:
        store = PostgresVaultStore(vault_postgres_dsn)
        try:
            await store.migrate()
            await _setup(store)
            for n in range(4):
                await store.write_import_batch(batch(1 + 501 * n, 500, ext=f"b{n}_"))
        finally:
            await store.close()
        conn = await asyncpg.connect(vault_postgres_dsn)
        plans = []
        try:
            # No ANALYZE: the statistics of tables an import is filling are stale, which
            # is what once made the generic plan filter the whole account.
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            for name, sql in (("links", imports._LINKS), ("prints", imports._FINGERPRINTS)):
                await conn.execute(f"PREPARE {name}(text, boolean, text[]) AS {sql}")
                found = await conn.fetch(f"EXPLAIN EXECUTE {name}('{ACCT}', false, ARRAY['a'])")
                plans.append("\n".join(r[0] for r in found))
        finally:
            await conn.close()
        return plans

    for plan in asyncio.run(main()):
        assert "Seq Scan on import_links" not in plan
        assert "Seq Scan on payment_methods" not in plan
        assert "Filter" not in plan, plan
        assert "= wanted." in plan, plan  # the index condition names the value looked up
