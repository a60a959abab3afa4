"""The VaultStore contract: every implementation must pass this one suite.

Each contract test runs once on :class:`SQLiteVaultStore` (a file in ``tmp_path``) and
once on :class:`PostgresVaultStore` (a database created for the test on the server at
127.0.0.1:5432 and dropped after it; CI starts the server, so an unreachable server is
a failure, not a skip). pytest-asyncio is not used: each test runs its check in one
``asyncio.run``, and the store is opened inside that event loop (asyncpg's pool belongs
to the loop that made it). A few tests at the end are about one backend only: SQLite's
group commit, file modes and secure delete.

The fixtures live in this file rather than a conftest so that the other contract
suites in this folder stay independent of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import re
import secrets
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cardvault.errors import ConfigurationError
from cardvault.storage import (
    Account,
    ApiKey,
    DataKeyRecord,
    DuplicateError,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    PostgresVaultStore,
    SQLiteVaultStore,
    StoreUnavailable,
    VaultStore,
    open_vault_store,
)
from cardvault.storage.base import (
    CLAIMED,
    COMPLETED,
    DONE,
    PENDING,
    UNKNOWN,
    KeyJob,
    PreconditionFailed,
    TakenCvc,
    UnstorableValue,
)
from cardvault.storage.migrations import VAULT_SCHEMA, Schema

#: The server CI starts; trust authentication for the ``postgres`` role.
POSTGRES_ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)

Check = Callable[[VaultStore], Awaitable[None]]


@dataclass
class Backend:
    name: str
    open: Callable[[], VaultStore]
    #: The SQLite file, or the PostgreSQL DSN, for looking under the store.
    path: Path | None = None
    dsn: str | None = None

    def run(self, check: Check, *, migrate: bool = True) -> None:
        """In one new event loop: open a store, migrate, run ``check``, close."""

        async def main() -> None:
            store = self.open()
            try:
                if migrate:
                    await store.migrate()
                await check(store)
            finally:
                await store.close()

        asyncio.run(main())

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``?`` placeholders) on a connection of its own, past the store."""
        if self.path is not None:
            path = self.path

            def work() -> list[tuple[Any, ...]]:
                with contextlib.closing(sqlite3.connect(path)) as conn:
                    return conn.execute(sql, args).fetchall()

            return await asyncio.to_thread(work)
        import asyncpg

        numbers = iter(range(1, 100))
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *args)
        finally:
            await conn.close()
        return [tuple(r) for r in rows]

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one writing statement (``?`` placeholders) past the store, committed."""
        if self.path is not None:
            path = self.path

            def work() -> None:
                with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                    conn.execute(sql, args)

            await asyncio.to_thread(work)
            return
        import asyncpg

        numbers = iter(range(1, 100))
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *args)
        finally:
            await conn.close()


async def _admin_execute(sql: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {POSTGRES_ADMIN_DSN} ({type(exc).__name__}: {exc}); "
            "the contract suite needs it, and CI starts it",
            pytrace=False,
        )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def vault_postgres_dsn() -> Iterator[str]:
    """A DSN for a database created for this test alone, dropped afterwards."""
    import asyncpg

    name = f"vault_test_{secrets.token_hex(6)}"
    try:
        # A linguistic collation, as production databases often have ("pm_a" < "pm_B"),
        # so the id tie-break of listing is checked against one. C-collated servers
        # would hide a missing ``COLLATE "C"``.
        asyncio.run(
            _admin_execute(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            )
        )
    except asyncpg.PostgresError:  # a server built without ICU
        asyncio.run(_admin_execute(f"CREATE DATABASE {name}"))
    try:
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        # FORCE ends a connection a failed test may have left open.
        asyncio.run(_admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "vault.db"
        return Backend("sqlite", lambda: SQLiteVaultStore(path), path=path)
    dsn = request.getfixturevalue("vault_postgres_dsn")
    return Backend("postgres", lambda: PostgresVaultStore(dsn), dsn=dsn)


# -- records -----------------------------------------------------------------------------

NOW = 1_760_000_000
ACCT = "acct_1Alpha"
OTHER = "acct_2Beta"
DK = "dk_pan_1"
DK_CVC = "dk_cvc_1"


def account(account_id: str = ACCT, **changes: Any) -> Account:
    return dataclasses.replace(Account(account_id, "Alpha Shop", NOW), **changes)


def api_key(key_id: str, *, account_id: str = ACCT, **changes: Any) -> ApiKey:
    record = ApiKey(
        id=key_id,
        account_id=account_id,
        kind="secret",
        mode="test",
        prefix="sk_test_AbCd",
        hash=secrets.token_hex(32),
        created=NOW,
    )
    return dataclasses.replace(record, **changes)


def data_key(key_id: str = DK, kek: str = "pan") -> DataKeyRecord:
    return DataKeyRecord(key_id, kek, 3, secrets.token_bytes(60), NOW)


def pm(
    pm_id: str,
    *,
    account_id: str = ACCT,
    livemode: bool = False,
    created: int = NOW,
    cvc: bytes | None = None,
    cvc_expires: int | None = None,
    **changes: Any,
) -> PaymentMethodRecord:
    record = PaymentMethodRecord(
        id=pm_id,
        account_id=account_id,
        livemode=livemode,
        created=created,
        data_key_id=DK,
        number_ct=secrets.token_bytes(48),
        brand="visa",
        last4="4242",
        exp_month=12,
        exp_year=2034,
        funding="credit",
        fingerprint=secrets.token_hex(8),
        cvc_ct=cvc,
        cvc_data_key_id=DK_CVC if cvc is not None else None,
        cvc_expires=cvc_expires,
        cvc_check="unchecked" if cvc is not None else None,
    )
    return dataclasses.replace(record, **changes)


def claim(
    key: str, *, account_id: str = ACCT, mode: Mode = "test", **changes: Any
) -> IdempotencyRecord:
    record = IdempotencyRecord(
        account_id=account_id, mode=mode, key=key, request_hash="h" * 64, created=NOW
    )
    return dataclasses.replace(record, **changes)


def held(key: str, token: str, **changes: Any) -> IdempotencyRecord:
    """A claim as the vault makes it: held by a replica under a boot, with a lease and
    the id of its effect."""
    record = claim(
        key,
        owner="host-a",
        boot="boot-1",
        token=token,
        lease_until=NOW + 300,
        effect_id=f"pm_{key}",
    )
    return dataclasses.replace(record, **changes)


async def seed(store: VaultStore) -> None:
    """Two accounts and the data keys every payment method refers to."""
    await store.create_account(account(ACCT))
    await store.create_account(account(OTHER, name="Beta Shop"))
    await store.insert_data_key(data_key(DK, "pan"))
    await store.insert_data_key(data_key(DK_CVC, "cvc"))


def without_cvc(record: PaymentMethodRecord) -> PaymentMethodRecord:
    return dataclasses.replace(record, cvc_ct=None, cvc_data_key_id=None, cvc_expires=None)


# -- migrations ----------------------------------------------------------------------------


def test_migrate_twice_is_harmless_and_keeps_data(backend: Backend) -> None:
    stored = pm("pm_keep")

    async def check(store: VaultStore) -> None:
        await store.migrate()
        await seed(store)
        await store.insert_payment_method(stored)
        await store.migrate()
        await store.migrate()
        assert await store.get_payment_method(ACCT, False, "pm_keep") == stored
        versions = await backend.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [v for (v,) in versions] == list(range(1, VAULT_SCHEMA.latest + 1))

    backend.run(check, migrate=False)


def at_version(store: VaultStore, version: int) -> VaultStore:
    """``store``, migrating only up to ``version`` (an older release's schema)."""
    store.schema = Schema("vault", VAULT_SCHEMA.migrations[:version], lock=VAULT_SCHEMA.lock)  # type: ignore[misc]
    return store


_OLD_CLAIM = (
    "INSERT INTO idempotency_keys (account_id, mode, idempotency_key, request_hash, created, "
    "response_status, response_body) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def test_migration_3_drops_idempotency_keys_stored_in_the_clear(backend: Backend) -> None:
    # Before version 3 the Idempotency-Key header was stored verbatim, and a caller could
    # put a card number in it. Since then the vault stores "ik_" and a MAC.
    async def check(store: VaultStore) -> None:
        await at_version(store, 2).migrate()
        await seed(store)
        for key in ("order-17 retry", "ik_AbCdEfGhIjKlMnOp", "ikX-not-a-mac"):
            await backend.execute(_OLD_CLAIM, ACCT, "test", key, "h" * 64, NOW, None, None)
        await at_version(store, VAULT_SCHEMA.latest).migrate()
        rows = await backend.fetch("SELECT idempotency_key FROM idempotency_keys")
        assert [k for (k,) in rows] == ["ik_AbCdEfGhIjKlMnOp"]

    backend.run(check, migrate=False)


def test_migration_4_keeps_answers_and_makes_older_claims_stale_at_once(
    backend: Backend,
) -> None:
    # Claims of the release before have no holder and name no effect: their requests died
    # with the upgrade, so they are stale at once and the next request runs afresh.
    async def check(store: VaultStore) -> None:
        await at_version(store, 3).migrate()
        await seed(store)
        await backend.execute(_OLD_CLAIM, ACCT, "test", "ik_done", "h" * 64, NOW, 200, "pm_1")
        await backend.execute(_OLD_CLAIM, ACCT, "test", "ik_running", "h" * 64, NOW, None, None)
        await at_version(store, VAULT_SCHEMA.latest).migrate()
        done = await store.claim_idempotency_key(claim("ik_done"))
        running = await store.claim_idempotency_key(claim("ik_running"))
        assert done is not None
        assert (done.state, done.response_status, done.response_body) == (DONE, 200, "pm_1")
        assert running is not None
        assert (running.state, running.lease_until, running.effect_id) == (CLAIMED, 0, None)
        assert running.token is not None
        stale = await store.stale_idempotency_claims(NOW, "host", "boot", limit=10)
        assert [r.key for r in stale] == ["ik_running"]

    backend.run(check, migrate=False)


def test_migrate_from_two_stores_at_once_applies_each_version_once(backend: Backend) -> None:
    async def check(first: VaultStore) -> None:
        second = backend.open()
        try:
            await asyncio.gather(first.migrate(), second.migrate())
            await seed(second)
            assert await first.get_account(ACCT) == account(ACCT)
        finally:
            await second.close()
        versions = await backend.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [v for (v,) in versions] == list(range(1, VAULT_SCHEMA.latest + 1))

    backend.run(check, migrate=False)


# -- accounts ------------------------------------------------------------------------------


def test_get_account_returns_the_created_account_or_none(backend: Backend) -> None:
    framed = account(OTHER, allowed_origins=("https://shop.example", "https://b.example"))

    async def check(store: VaultStore) -> None:
        assert await store.get_account(ACCT) is None
        await store.create_account(account(ACCT))
        await store.create_account(framed)
        assert await store.get_account(ACCT) == account(ACCT)
        assert await store.get_account(OTHER) == framed
        assert await store.get_account("acct_missing") is None

    backend.run(check)


def test_create_account_with_an_existing_id_raises_duplicate(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await store.create_account(account(ACCT))
        with pytest.raises(DuplicateError):
            await store.create_account(account(ACCT, name="Impostor"))
        assert await store.get_account(ACCT) == account(ACCT)

    backend.run(check)


# -- API keys ------------------------------------------------------------------------------


def test_find_api_key_returns_the_key_with_that_hash_or_none(backend: Backend) -> None:
    secret = api_key("key_secret")
    publishable = api_key("key_pub", kind="publishable", mode="live", prefix="pk_live_XyZw")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.create_api_key(secret)
        await store.create_api_key(publishable)
        assert await store.find_api_key(secret.hash) == secret
        assert await store.find_api_key(publishable.hash) == publishable
        assert await store.find_api_key(secrets.token_hex(32)) is None

    backend.run(check)


def test_create_api_key_with_an_existing_id_or_hash_raises_duplicate(backend: Backend) -> None:
    first = api_key("key_1")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.create_api_key(first)
        with pytest.raises(DuplicateError):
            await store.create_api_key(api_key("key_1"))
        with pytest.raises(DuplicateError):
            await store.create_api_key(api_key("key_2", hash=first.hash))
        assert await store.list_api_keys(ACCT) == [first]

    backend.run(check)


def test_list_api_keys_returns_only_that_accounts_keys(backend: Backend) -> None:
    mine = {api_key("key_a"), api_key("key_b", mode="live"), api_key("key_c", created=NOW + 5)}
    theirs = api_key("key_other", account_id=OTHER)

    async def check(store: VaultStore) -> None:
        await seed(store)
        for key in [*mine, theirs]:
            await store.create_api_key(key)
        assert set(await store.list_api_keys(ACCT)) == mine
        assert await store.list_api_keys(OTHER) == [theirs]
        assert await store.list_api_keys("acct_nobody") == []

    backend.run(check)


def test_revoke_api_key_succeeds_once_then_returns_false(backend: Backend) -> None:
    key = api_key("key_1")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.create_api_key(key)
        assert await store.revoke_api_key("key_1", NOW + 10) is True
        assert await store.revoke_api_key("key_1", NOW + 20) is False
        assert await store.revoke_api_key("key_missing", NOW) is False
        found = await store.find_api_key(key.hash)
        assert found == dataclasses.replace(key, revoked=NOW + 10)

    backend.run(check)


# -- data keys -----------------------------------------------------------------------------


def test_data_key_round_trips_and_a_duplicate_id_raises(backend: Backend) -> None:
    record = data_key("dk_one")

    async def check(store: VaultStore) -> None:
        assert await store.get_data_key("dk_one") is None
        await store.insert_data_key(record)
        assert await store.get_data_key("dk_one") == record
        with pytest.raises(DuplicateError):
            await store.insert_data_key(data_key("dk_one"))
        assert await store.get_data_key("dk_one") == record

    backend.run(check)


def test_data_keys_are_counted_walked_and_moved_one_row_each(backend: Backend) -> None:
    """The re-encryption job's queries: counts by version, the walk in id order below a
    version, moves only where the row is still under the version it was read under."""

    async def check(store: VaultStore) -> None:
        for i in range(5):
            await store.insert_data_key(DataKeyRecord(f"dk_m{i}", "pan", 1, b"old%d" % i, NOW))
        await store.insert_data_key(DataKeyRecord("dk_c", "cvc", 1, b"cvc", NOW))
        assert await store.data_key_counts() == {"pan": {1: 5}, "cvc": {1: 1}}
        first = await store.data_keys_below("pan", 2, "", 3)
        assert [r.id for r in first] == ["dk_m0", "dk_m1", "dk_m2"]
        rest = await store.data_keys_below("pan", 2, first[-1].id, 3)
        assert [r.id for r in rest] == ["dk_m3", "dk_m4"]
        moves = [(r.id, r.kek_version, b"new" + r.id.encode(), 2) for r in first]
        assert await store.move_data_keys(moves) == 3
        # Again (a resumed batch): nothing is under v1 any more, nothing moves.
        assert await store.move_data_keys(moves) == 0
        assert await store.data_key_counts() == {"pan": {1: 2, 2: 3}, "cvc": {1: 1}}
        moved = await store.get_data_key("dk_m0")
        assert moved is not None
        assert (moved.kek_version, moved.wrapped) == (2, b"newdk_m0")
        assert await store.get_key_job("pan") is None
        job = KeyJob("pan", "rr_1", 2, "dk_m2", 3, NOW, NOW)
        await store.put_key_job(job)
        assert await store.get_key_job("pan") == job
        done = KeyJob("pan", "rr_1", 2, "", 5, NOW, NOW + 1, NOW + 1)
        await store.put_key_job(done)
        assert await store.get_key_job("pan") == done

    backend.run(check)


def test_cards_sealed_under_old_data_keys_are_walked_and_resealed_one_row_each(
    backend: Backend,
) -> None:
    """The card-data re-encryption's queries (``reencrypt --data``): the walk in id
    order over cards whose data key was made before a time, the count, and the re-seal
    that changes a row's data key and ciphertexts together, only where the row is still
    under the key it was read under (and, for a CVC, still holds it)."""

    async def check(store: VaultStore) -> None:
        await seed(store)  # DK and DK_CVC, made at NOW
        await store.insert_data_key(DataKeyRecord("dk_new", "pan", 3, b"w", NOW + 100))
        await store.insert_data_key(DataKeyRecord("dk_newc", "cvc", 3, b"w", NOW + 100))
        for i in range(4):
            await store.insert_payment_method(
                pm(f"pm_o{i}", name_ct=b"n%d" % i if i % 2 else None, cvc=b"c%d" % i)
            )
        await store.insert_payment_method(pm("pm_young", data_key_id="dk_new"))
        assert await store.count_cards_sealed_before("pan", NOW) == 0
        assert await store.count_cards_sealed_before("pan", NOW + 1) == 4
        first = await store.cards_sealed_before("pan", NOW + 1, "", 3)
        assert [r.id for r in first] == ["pm_o0", "pm_o1", "pm_o2"]
        rest = await store.cards_sealed_before("pan", NOW + 1, first[-1].id, 3)
        assert [r.id for r in rest] == ["pm_o3"]
        reseals = [(r.id, DK, "dk_new", b"ct" + r.id.encode(), r.name_ct) for r in first]
        assert await store.reseal_cards("pan", reseals) == 3
        # Again (a resumed batch): no row is under DK any more, nothing changes.
        assert await store.reseal_cards("pan", reseals) == 0
        assert await store.count_cards_sealed_before("pan", NOW + 1) == 1
        moved = await store.get_payment_method(ACCT, False, "pm_o1")
        assert moved is not None
        assert (moved.data_key_id, moved.number_ct, moved.name_ct) == ("dk_new", b"ctpm_o1", b"n1")
        assert moved.cvc_ct == b"c1"  # the CVC is another KEK's: untouched
        # CVCs: one taken meanwhile is not put back by a re-seal read before the take.
        cvcs = await store.cards_sealed_before("cvc", NOW + 1, "", 10)
        assert [r.id for r in cvcs] == ["pm_o0", "pm_o1", "pm_o2", "pm_o3"]
        assert await store.take_cvc(ACCT, False, "pm_o0") is not None
        cvc_reseals = [(r.id, DK_CVC, "dk_newc", b"new" + r.id.encode(), None) for r in cvcs]
        assert await store.reseal_cards("cvc", cvc_reseals) == 3
        taken = await store.get_payment_method(ACCT, False, "pm_o0")
        assert taken is not None
        assert (taken.cvc_ct, taken.cvc_data_key_id) == (None, None)
        kept = await store.get_payment_method(ACCT, False, "pm_o2")
        assert kept is not None
        assert (kept.cvc_ct, kept.cvc_data_key_id) == (b"newpm_o2", "dk_newc")
        assert await store.count_cards_sealed_before("cvc", NOW + 1) == 0
        job = KeyJob("pan:data", "rr_2", 0, "pm_o2", 3, NOW, NOW, data_before=NOW + 1)
        await store.put_key_job(job)
        assert await store.get_key_job("pan:data") == job
        assert await store.get_key_job("pan") is None

    backend.run(check)


# -- payment methods: insert and get -------------------------------------------------------


def test_insert_payment_method_round_trips_every_field(backend: Backend) -> None:
    full = pm(
        "pm_full",
        livemode=True,
        name_ct=secrets.token_bytes(40),
        metadata={"order_id": "6735", "note": "café ☕"},
        billing_details={
            "email": "jenny@example.com",
            "phone": None,
            "address": {"city": "Berlin", "postal_code": "10115", "line2": None},
        },
        cvc=secrets.token_bytes(32),
        cvc_expires=NOW + 3600,
        cvc_check="pass",
    )
    bare = pm("pm_bare")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(full)
        await store.insert_payment_method(bare)
        assert await store.get_payment_method(ACCT, True, "pm_full") == full
        assert await store.get_payment_method(ACCT, False, "pm_bare") == bare
        assert await store.get_payment_method(ACCT, False, "pm_missing") is None

    backend.run(check)


def test_insert_payment_method_with_an_existing_id_raises_and_keeps_the_first(
    backend: Backend,
) -> None:
    first = pm("pm_1")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(first)
        with pytest.raises(DuplicateError):
            await store.insert_payment_method(pm("pm_1"))
        # Even from another account or mode: ids are global.
        with pytest.raises(DuplicateError):
            await store.insert_payment_method(pm("pm_1", account_id=OTHER, livemode=True))
        assert await store.get_payment_method(ACCT, False, "pm_1") == first

    backend.run(check)


def test_a_record_is_invisible_to_another_mode_and_another_account(backend: Backend) -> None:
    record = pm("pm_test", cvc=b"c" * 32, cvc_expires=NOW + 60)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        for account_id, livemode in [(ACCT, True), (OTHER, False), (OTHER, True)]:
            assert await store.get_payment_method(account_id, livemode, "pm_test") is None
            assert await store.list_payment_methods(account_id, livemode, limit=10) == []
            assert await store.delete_payment_method(account_id, livemode, "pm_test") is False
            assert await store.destroy_cvc(account_id, livemode, "pm_test") is False
        assert await store.get_payment_method(ACCT, False, "pm_test") == record
        assert await store.list_payment_methods(ACCT, False, limit=10) == [record]

    backend.run(check)


# -- payment methods: listing --------------------------------------------------------------

#: Seven distinct seconds, and three records sharing one of them. The ids of the three
#: differ in case, so "id descending" must mean bytewise on every backend.
LISTED = [
    pm("pm_00first", created=NOW + 1),
    pm("pm_01", created=NOW + 2),
    pm("pm_02", created=NOW + 3),
    pm("pm_tieB", created=NOW + 4),
    pm("pm_tiea", created=NOW + 4),
    pm("pm_tieZ", created=NOW + 4),
    pm("pm_03", created=NOW + 5),
    pm("pm_04", created=NOW + 6),
    pm("pm_05last", created=NOW + 7),
    pm("pm_99early", created=NOW),
]
NEWEST_FIRST = sorted(LISTED, key=lambda r: (r.created, r.id.encode()), reverse=True)
#: Records of the same account in the other mode, and of another account, made in the
#: same seconds: a list must never show them.
NOISE = [
    pm("pm_live_x", livemode=True, created=NOW + 4),
    pm("pm_live_y", livemode=True, created=NOW + 8),
    pm("pm_other_x", account_id=OTHER, created=NOW + 4),
    pm("pm_other_y", account_id=OTHER, created=NOW + 9),
]


async def seed_listing(store: VaultStore) -> None:
    await seed(store)
    shuffled = LISTED + NOISE
    random.Random(7).shuffle(shuffled)
    for record in shuffled:
        await store.insert_payment_method(record)


def test_list_is_newest_first_with_ties_broken_by_id_descending(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed_listing(store)
        listed = await store.list_payment_methods(ACCT, False, limit=100)
        assert [r.id for r in listed] == [r.id for r in NEWEST_FIRST]
        assert listed == NEWEST_FIRST
        ties = [r.id for r in listed if r.created == NOW + 4]
        assert ties == ["pm_tiea", "pm_tieZ", "pm_tieB"]
        assert await store.list_payment_methods(ACCT, False, limit=3) == NEWEST_FIRST[:3]
        assert await store.list_payment_methods(ACCT, True, limit=100) == [NOISE[1], NOISE[0]]

    backend.run(check)


@pytest.mark.parametrize("limit", [1, 3, 4, 20])
def test_starting_after_pages_through_every_record_once(backend: Backend, limit: int) -> None:
    async def check(store: VaultStore) -> None:
        await seed_listing(store)
        seen: list[PaymentMethodRecord] = []
        page = await store.list_payment_methods(ACCT, False, limit=limit)
        while page:
            assert len(page) <= limit
            assert page == NEWEST_FIRST[len(seen) : len(seen) + limit]
            seen += page
            page = await store.list_payment_methods(
                ACCT, False, limit=limit, starting_after=page[-1].id
            )
        assert seen == NEWEST_FIRST

    backend.run(check)


@pytest.mark.parametrize("limit", [1, 3, 4, 20])
def test_ending_before_pages_back_to_the_newest_record(backend: Backend, limit: int) -> None:
    async def check(store: VaultStore) -> None:
        await seed_listing(store)
        # From the oldest record back towards the newest, each page still newest first.
        end = len(NEWEST_FIRST) - 1
        cursor = NEWEST_FIRST[end].id
        while True:
            page = await store.list_payment_methods(ACCT, False, limit=limit, ending_before=cursor)
            assert page == NEWEST_FIRST[max(0, end - limit) : end]
            if not page:
                break
            end -= len(page)
            cursor = page[0].id
        assert end == 0

    backend.run(check)


def test_cursors_at_the_ends_and_from_elsewhere_give_empty_pages(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed_listing(store)
        newest, oldest = NEWEST_FIRST[0].id, NEWEST_FIRST[-1].id
        assert await store.list_payment_methods(ACCT, False, limit=5, starting_after=oldest) == []
        assert await store.list_payment_methods(ACCT, False, limit=5, ending_before=newest) == []
        # Another account's (or mode's) id is no cursor here: nothing leaks through it.
        for foreign in ("pm_other_x", "pm_live_x", "pm_missing"):
            for side in ("starting_after", "ending_before"):
                kwargs: dict[str, Any] = {side: foreign}
                assert await store.list_payment_methods(ACCT, False, limit=5, **kwargs) == []

    backend.run(check)


def test_list_rejects_a_limit_below_one_and_two_cursors(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed_listing(store)
        with pytest.raises(ValueError):
            await store.list_payment_methods(ACCT, False, limit=0)
        with pytest.raises(ValueError):
            await store.list_payment_methods(
                ACCT, False, limit=5, starting_after="pm_01", ending_before="pm_04"
            )

    backend.run(check)


# -- payment methods: delete and CVC erasure -----------------------------------------------


def test_delete_returns_true_then_false_and_the_record_is_gone(backend: Backend) -> None:
    doomed, kept = pm("pm_doomed", cvc=b"x" * 32, cvc_expires=NOW), pm("pm_kept")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(doomed)
        await store.insert_payment_method(kept)
        assert await store.delete_payment_method(ACCT, False, "pm_doomed") is True
        assert await store.delete_payment_method(ACCT, False, "pm_doomed") is False
        assert await store.delete_payment_method(ACCT, False, "pm_never") is False
        assert await store.get_payment_method(ACCT, False, "pm_doomed") is None
        assert await store.list_payment_methods(ACCT, False, limit=10) == [kept]
        assert await store.destroy_cvc(ACCT, False, "pm_doomed") is False
        # The id is free again.
        await store.insert_payment_method(pm("pm_doomed"))

    backend.run(check)


def test_destroy_cvc_erases_the_cvc_once_and_keeps_the_rest(backend: Backend) -> None:
    with_cvc = pm("pm_cvc", cvc=secrets.token_bytes(32), cvc_expires=NOW + 3600)
    no_cvc = pm("pm_plain")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(with_cvc)
        await store.insert_payment_method(no_cvc)
        assert await store.destroy_cvc(ACCT, False, "pm_cvc") is True
        erased = await store.get_payment_method(ACCT, False, "pm_cvc")
        assert erased == without_cvc(with_cvc)
        assert erased is not None and erased.cvc_check == "unchecked"
        assert await store.destroy_cvc(ACCT, False, "pm_cvc") is False
        assert await store.destroy_cvc(ACCT, False, "pm_plain") is False
        assert await store.destroy_cvc(ACCT, False, "pm_missing") is False
        assert await store.get_payment_method(ACCT, False, "pm_plain") == no_cvc

    backend.run(check)


def test_destroy_expired_cvcs_erases_every_due_cvc_and_counts_them(backend: Backend) -> None:
    due_early = pm("pm_due_early", cvc=b"a" * 32, cvc_expires=NOW - 100)
    due_now = pm("pm_due_now", account_id=OTHER, livemode=True, cvc=b"b" * 32, cvc_expires=NOW)
    later = pm("pm_later", cvc=b"c" * 32, cvc_expires=NOW + 1)
    none = pm("pm_none")

    async def check(store: VaultStore) -> None:
        await seed(store)
        for record in (due_early, due_now, later, none):
            await store.insert_payment_method(record)
        assert await store.destroy_expired_cvcs(NOW) == 2
        assert await store.get_payment_method(ACCT, False, "pm_due_early") == without_cvc(due_early)
        assert await store.get_payment_method(OTHER, True, "pm_due_now") == without_cvc(due_now)
        assert await store.get_payment_method(ACCT, False, "pm_later") == later
        assert await store.get_payment_method(ACCT, False, "pm_none") == none
        assert await store.destroy_expired_cvcs(NOW) == 0
        assert await store.destroy_expired_cvcs(NOW + 1) == 1
        assert await store.get_payment_method(ACCT, False, "pm_later") == without_cvc(later)

    backend.run(check)


# -- idempotency ---------------------------------------------------------------------------


def test_claim_returns_none_first_then_the_existing_record(backend: Backend) -> None:
    first = claim("idem_1", request_hash="a" * 64)

    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.claim_idempotency_key(first) is None
        again = claim("idem_1", request_hash="b" * 64, created=NOW + 5)
        assert await store.claim_idempotency_key(again) == first

    backend.run(check)


def test_complete_stores_the_response_for_later_claims(backend: Backend) -> None:
    first = claim("idem_1")
    body = '{"id": "pm_1", "object": "payment_method", "note": "é"}'

    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.claim_idempotency_key(first) is None
        assert await store.complete_idempotency_key(ACCT, "test", "idem_1", 200, body)
        existing = await store.claim_idempotency_key(claim("idem_1", created=NOW + 1))
        assert existing == dataclasses.replace(
            first, response_status=200, response_body=body, state=DONE
        )

    backend.run(check)


def test_release_forgets_an_in_flight_claim(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.claim_idempotency_key(claim("idem_1")) is None
        await store.release_idempotency_key(ACCT, "test", "idem_1")
        retry = claim("idem_1", request_hash="c" * 64, created=NOW + 9)
        assert await store.claim_idempotency_key(retry) is None
        assert await store.claim_idempotency_key(claim("idem_1")) == retry
        # Releasing what is not there is harmless.
        await store.release_idempotency_key(ACCT, "test", "idem_none")

    backend.run(check)


def test_claims_are_scoped_to_account_and_mode(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.claim_idempotency_key(claim("k")) is None
        assert await store.claim_idempotency_key(claim("k", mode="live")) is None
        assert await store.claim_idempotency_key(claim("k", account_id=OTHER)) is None
        assert await store.complete_idempotency_key(ACCT, "live", "k", 402, "{}")
        assert await store.claim_idempotency_key(claim("k")) == claim("k")
        assert await store.claim_idempotency_key(claim("k", account_id=OTHER)) == claim(
            "k", account_id=OTHER
        )

    backend.run(check)


def test_purge_deletes_the_records_created_before_the_cutoff(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        for n, created in enumerate([NOW - 30, NOW - 20, NOW - 10, NOW]):
            assert await store.claim_idempotency_key(claim(f"k{n}", created=created)) is None
        assert await store.purge_idempotency_keys(NOW - 10) == 2
        assert await store.purge_idempotency_keys(NOW - 10) == 0
        # The purged keys can be claimed anew; the others still answer.
        assert await store.claim_idempotency_key(claim("k0", created=NOW + 1)) is None
        assert await store.claim_idempotency_key(claim("k1", created=NOW + 1)) is None
        assert await store.claim_idempotency_key(claim("k2")) == claim("k2", created=NOW - 10)
        assert await store.claim_idempotency_key(claim("k3")) == claim("k3", created=NOW)

    backend.run(check)


def test_concurrent_claims_from_two_stores_admit_exactly_one(backend: Backend) -> None:
    async def check(first: VaultStore) -> None:
        await seed(first)
        second = backend.open()
        try:
            attempts = [
                (first if n % 2 else second).claim_idempotency_key(
                    claim("race", request_hash=f"{n:064d}")
                )
                for n in range(40)
            ]
            results = await asyncio.gather(*attempts)
        finally:
            await second.close()
        winners = [n for n, r in enumerate(results) if r is None]
        assert len(winners) == 1
        winner = claim("race", request_hash=f"{winners[0]:064d}")
        assert all(r == winner for r in results if r is not None)

    backend.run(check)


# -- durability and group commit -----------------------------------------------------------


def test_data_persists_across_close_and_reopen(backend: Backend) -> None:
    record = pm("pm_durable", cvc=b"z" * 32, cvc_expires=NOW)
    key = api_key("key_durable")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        await store.create_api_key(key)
        assert await store.claim_idempotency_key(claim("idem")) is None
        await store.close()
        reopened = backend.open()
        try:
            await reopened.migrate()
            assert await reopened.get_payment_method(ACCT, False, "pm_durable") == record
            assert await reopened.find_api_key(key.hash) == key
            assert await reopened.get_data_key(DK) is not None
            assert await reopened.claim_idempotency_key(claim("idem")) == claim("idem")
        finally:
            await reopened.close()

    backend.run(check)


@pytest.mark.postgres
def test_postgres_concurrent_payment_methods_share_multi_row_inserts(
    vault_postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = PostgresVaultStore._insert_pms

    async def counting(self: PostgresVaultStore, batch: Any) -> None:
        batches.append(len(batch))
        await real(self, batch)

    monkeypatch.setattr(PostgresVaultStore, "_insert_pms", counting)
    records = [pm(f"pm_pgb_{n:04d}") for n in range(700)]

    async def main() -> None:
        store = PostgresVaultStore(vault_postgres_dsn)
        try:
            await store.migrate()
            await seed(store)
            assert (
                await asyncio.gather(*(store.insert_payment_method(r) for r in records))
                == [None] * 700
            )
            # Then one alone: it waits for no one.
            await store.insert_payment_method(pm("pm_pgb_alone"))
            assert await store.get_payment_method(ACCT, False, "pm_pgb_alone") is not None
        finally:
            await store.close()

    asyncio.run(main())
    # 700 rows queued together: at most PM_BATCH per statement, so two statements.
    assert batches == [512, 188, 1], batches


def test_500_concurrent_inserts_all_succeed_and_are_readable(backend: Backend) -> None:
    records = [pm(f"pm_many_{n:04d}", created=NOW + n) for n in range(500)]

    async def check(store: VaultStore) -> None:
        await seed(store)
        results = await asyncio.gather(*(store.insert_payment_method(r) for r in records))
        assert results == [None] * 500
        listed = await store.list_payment_methods(ACCT, False, limit=1000)
        assert listed == records[::-1]
        fetched = await asyncio.gather(
            *(store.get_payment_method(ACCT, False, r.id) for r in records)
        )
        assert fetched == records

    backend.run(check)


def test_a_duplicate_among_concurrent_inserts_fails_alone(backend: Backend) -> None:
    existing = pm("pm_existing")
    fresh = [pm(f"pm_fresh_{n:03d}", created=NOW + n) for n in range(200)]
    impostor = pm("pm_existing", created=NOW + 999)
    twin_a, twin_b = pm("pm_twin"), pm("pm_twin")

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(existing)
        batch = [*fresh[:100], impostor, twin_a, *fresh[100:150], twin_b, *fresh[150:]]
        results = await asyncio.gather(
            *(store.insert_payment_method(r) for r in batch), return_exceptions=True
        )
        failed = [batch[n] for n, r in enumerate(results) if r is not None]
        assert all(isinstance(r, DuplicateError) for r in results if r is not None)
        assert impostor in failed
        assert len(failed) == 2
        assert (twin_a in failed) != (twin_b in failed)
        assert await store.get_payment_method(ACCT, False, "pm_existing") == existing
        twin = await store.get_payment_method(ACCT, False, "pm_twin")
        assert twin in (twin_a, twin_b) and twin not in failed
        stored = await asyncio.gather(*(store.get_payment_method(ACCT, False, r.id) for r in fresh))
        assert stored == fresh

    backend.run(check)


@pytest.mark.parametrize(
    "bad",
    [
        {"metadata": {"order": "\ud800"}},
        {"billing_details": {"email": "x\udfff@example.com"}},
        {"exp_year": 2**70},
    ],
    ids=["lone-surrogate-metadata", "lone-surrogate-billing", "integer-past-64-bits"],
)
def test_a_value_no_store_can_hold_fails_its_own_insert_alone(
    backend: Backend, bad: dict[str, Any]
) -> None:
    # Before: a lone surrogate raised UnicodeEncodeError inside SQLite's multi-row
    # INSERT, which failed the whole group-commit batch: other accounts' cards too.
    fresh = [pm(f"pm_ok_{n:03d}", created=NOW + n) for n in range(40)]
    poison = pm("pm_poison", **bad)

    async def check(store: VaultStore) -> None:
        await seed(store)
        batch = [*fresh[:20], poison, *fresh[20:]]
        results = await asyncio.gather(
            *(store.insert_payment_method(r) for r in batch), return_exceptions=True
        )
        assert isinstance(results[20], UnstorableValue), results[20]
        assert [r for n, r in enumerate(results) if n != 20] == [None] * 40
        assert await store.get_payment_method(ACCT, False, "pm_poison") is None
        stored = await asyncio.gather(*(store.get_payment_method(ACCT, False, r.id) for r in fresh))
        assert stored == fresh
        # Alone, too.
        with pytest.raises(UnstorableValue):
            await store.insert_payment_method(poison)

    backend.run(check)


# -- SQLite only: group commit, file modes, secure delete ----------------------------------


def _sqlite_run(
    path: Path, check: Callable[[SQLiteVaultStore], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        store = SQLiteVaultStore(path, **kw)
        try:
            await store.migrate()
            await seed(store)
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("group_commit", [True, False])
def test_sqlite_concurrent_writes_share_a_transaction_and_are_committed_on_return(
    tmp_path: Path, group_commit: bool
) -> None:
    path = tmp_path / "vault.db"
    records = [pm(f"pm_gc_{n:03d}") for n in range(500)]

    async def check(store: SQLiteVaultStore) -> None:
        # Another connection holds the write lock while the 500 writes queue up, so
        # they are all waiting when the writer gets the lock.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        before = store.commits
        tasks = [asyncio.ensure_future(store.insert_payment_method(r)) for r in records]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in tasks)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert await asyncio.gather(*tasks) == [None] * 500
        # Answered means committed: a connection of its own sees every row.
        with contextlib.closing(sqlite3.connect(path)) as other:
            (count,) = other.execute("SELECT count(*) FROM payment_methods").fetchone()
        assert count == 500
        if group_commit:
            # The first write the writer took, then everything that queued behind it.
            assert store.commits - before <= 2
        else:
            assert store.commits - before == 500

    _sqlite_run(path, check, group_commit=group_commit)


@pytest.fixture
def small_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Path, Path]:
    """A checkpoint threshold of 256 KiB, the database's path and its WAL's."""
    from cardvault.storage.sqlite import wal as sqlite_store

    threshold = 256 * 1024
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_WAL_BYTES", threshold)
    return threshold, tmp_path / "vault.db", tmp_path / "vault.db-wal"


def test_sqlite_checkpoints_run_off_the_writer_and_keep_the_wal_bounded(
    small_wal: tuple[int, Path, Path],
) -> None:
    from cardvault.storage.sqlite import wal as sqlite_store

    threshold, path, wal = small_wal

    async def check(store: SQLiteVaultStore) -> None:
        largest = 0
        for n in range(400):  # one commit each: about 3 MB of WAL frames in all
            await store.insert_payment_method(pm(f"pm_ck_{n:03d}", metadata={"n": "x" * 400}))
            largest = max(largest, wal.stat().st_size)
        assert store.checkpoints >= 1  # on the checkpointer thread
        # The WAL is started over after checkpoints instead of growing with the writes:
        # at worst the writer checkpoints itself at 4x the threshold. (Slack: when the
        # checkpointer thread is mid-copy on a loaded machine the writer's own checkpoint
        # finds it busy, and a few more commits land before it is done: 1.2 MB was seen
        # against the 1 MB fallback; a WAL that grew with the writes would reach 3 MB.)
        limit = threshold * sqlite_store.CHECKPOINT_FALLBACK_FACTOR
        assert largest < limit + 256 * 1024, largest
        # ... and rarely: what triggers a checkpoint is the frames waiting (read from
        # the WAL index), not the size of a file that is reused.
        assert store.writer_checkpoints < 40, store.writer_checkpoints
        # The checkpointer's copies are the rows: a connection of its own sees them all.
        with contextlib.closing(sqlite3.connect(path)) as other:
            (count,) = other.execute(
                "SELECT count(*) FROM payment_methods WHERE id LIKE 'pm_ck_%'"
            ).fetchone()
        assert count == 400

    _sqlite_run(path, check)


def test_sqlite_wal_bytes_counts_the_frames_in_the_wal_and_the_wal_file_is_reused(
    small_wal: tuple[int, Path, Path],
) -> None:
    threshold, path, wal = small_wal

    async def check(store: SQLiteVaultStore) -> None:
        # A WAL that has never started over: the file is its 32-byte header and frames.
        for n in range(5):
            await store.insert_payment_method(pm(f"pm_wb_{n}"))
            assert store.wal_bytes() == wal.stat().st_size - 32
        # Past the threshold: the checkpointer copies the frames, a later commit starts
        # the WAL over at its beginning, and the file keeps its size instead of being
        # cut back and grown again.
        largest = 0
        for n in range(2000):
            await store.insert_payment_method(pm(f"pm_wb_x{n}", metadata={"n": "x" * 400}))
            largest = max(largest, wal.stat().st_size)
            waiting = store.wal_bytes()
            assert waiting is not None
            if store.checkpoints and waiting < threshold // 4:
                break
            await asyncio.sleep(0.001)  # time for the checkpointer thread
        else:
            raise AssertionError("the WAL never started over")
        assert largest >= threshold
        assert wal.stat().st_size == largest

    _sqlite_run(path, check)


def test_sqlite_reading_the_wal_index_keeps_sqlites_locks_on_the_shm_file(
    tmp_path: Path,
) -> None:
    # Closing any descriptor of a file drops the process's fcntl locks on it. SQLite
    # holds a shared lock on the -shm file's "DMS" byte (128) while a connection is
    # open, so that no other process rebuilds the file under it; after the store has
    # read the WAL index, another process must still be unable to lock that byte.
    path = tmp_path / "vault.db"
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\n"
        "except OSError:\n"
        "    print('held')\n"
        "else:\n"
        "    print('free')\n"
    )

    async def check(store: SQLiteVaultStore) -> None:
        for n in range(3):
            await store.insert_payment_method(pm(f"pm_lock_{n}"))
        assert store.wal_bytes() is not None
        out = subprocess.run(
            [sys.executable, "-c", probe, f"{path}-shm"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        assert out == "held"

    _sqlite_run(path, check)


def test_sqlite_a_bug_in_the_writer_fails_the_batch_instead_of_leaving_it_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "vault.db"
    real = SQLiteVaultStore._insert_run
    calls = 0

    def broken_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return real(*args)

    async def check(store: SQLiteVaultStore) -> None:
        monkeypatch.setattr(SQLiteVaultStore, "_insert_run", staticmethod(broken_once))
        results = await asyncio.wait_for(
            asyncio.gather(
                *(store.insert_payment_method(pm(f"pm_bug_{n}")) for n in range(3)),
                return_exceptions=True,
            ),
            timeout=5,
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert await store.get_payment_method(ACCT, False, "pm_bug_0") is None
        # The writer goes on: the next write works.
        await store.insert_payment_method(pm("pm_bug_after"))
        assert await store.get_payment_method(ACCT, False, "pm_bug_after") is not None

    _sqlite_run(path, check)


def test_sqlite_a_failing_write_fails_alone_inside_a_shared_transaction(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    existing = pm("pm_existing")
    fresh = [pm(f"pm_fresh_{n:03d}") for n in range(100)]
    # A duplicate id, and a data key that does not exist (a foreign-key failure).
    bad = [pm("pm_existing"), pm("pm_orphan", data_key_id="dk_missing")]

    async def check(store: SQLiteVaultStore) -> None:
        await store.insert_payment_method(existing)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        before = store.commits
        batch = [*fresh[:50], *bad, *fresh[50:]]
        tasks = [asyncio.ensure_future(store.insert_payment_method(r)) for r in batch]
        await asyncio.sleep(0.3)
        blocker.execute("ROLLBACK")
        blocker.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert store.commits - before <= 2
        assert isinstance(results[50], DuplicateError)
        assert isinstance(results[51], sqlite3.IntegrityError)
        assert results[:50] + results[52:] == [None] * 100
        assert await store.get_payment_method(ACCT, False, "pm_existing") == existing
        assert await store.get_payment_method(ACCT, False, "pm_orphan") is None
        listed = await store.list_payment_methods(ACCT, False, limit=200)
        assert {r.id for r in listed} == {r.id for r in [existing, *fresh]}

    _sqlite_run(path, check)


def test_sqlite_a_failing_compound_write_is_undone_as_a_whole(tmp_path: Path) -> None:
    # Operations of several statements (migrations) run in a savepoint: when one fails
    # half-way, its first statements are undone too, and its batch-mates still commit.
    path = tmp_path / "vault.db"

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO accounts (id, name, created, allowed_origins) "
            "VALUES ('acct_half', 'Half', 0, '[]')"
        )
        raise RuntimeError("the second statement failed")

    async def check(store: SQLiteVaultStore) -> None:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        before = store.commits
        first = asyncio.ensure_future(store.insert_payment_method(pm("pm_first")))
        await asyncio.sleep(0.05)
        compound = asyncio.ensure_future(store._write(half_done, compound=True))
        last = asyncio.ensure_future(store.insert_payment_method(pm("pm_last")))
        await asyncio.sleep(0.2)
        blocker.execute("ROLLBACK")
        blocker.close()
        with pytest.raises(RuntimeError, match="second statement"):
            await compound
        await asyncio.gather(first, last)
        # [pm_first], then [half_done, pm_last]; or all three at once on a slow machine.
        assert store.commits - before in (1, 2)
        assert await store.get_account("acct_half") is None
        assert await store.get_payment_method(ACCT, False, "pm_last") is not None

    _sqlite_run(path, check)


def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "vault.db"

    async def check(store: SQLiteVaultStore) -> None:
        await store.insert_payment_method(pm("pm_1"))
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    old = os.umask(0)
    try:
        _sqlite_run(path, check)
    finally:
        os.umask(old)


def _raw_bytes(path: Path) -> bytes:
    """The database file and its WAL, as they lie on disk."""
    files = [path, Path(f"{path}-wal"), Path(f"{path}-journal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


ERASURES: dict[str, Callable[[VaultStore], Awaitable[object]]] = {
    "delete": lambda s: s.delete_payment_method(ACCT, False, "pm_secret"),
    "destroy_cvc": lambda s: s.destroy_cvc(ACCT, False, "pm_secret"),
    "destroy_expired_cvcs": lambda s: s.destroy_expired_cvcs(NOW),
}


@pytest.mark.parametrize("erasure", list(ERASURES))
@pytest.mark.parametrize("when", ["after_close", "after_checkpoint", "while_open"])
def test_sqlite_erased_ciphertext_is_not_left_in_the_files(
    tmp_path: Path, erasure: str, when: str
) -> None:
    path = tmp_path / "vault.db"
    number_ct, cvc_ct = secrets.token_bytes(64), secrets.token_bytes(64)
    secret = pm("pm_secret", number_ct=number_ct, cvc=cvc_ct, cvc_expires=NOW)
    erased = number_ct if erasure == "delete" else cvc_ct

    async def main() -> None:
        store = SQLiteVaultStore(path)
        try:
            await store.migrate()
            await seed(store)
            await store.insert_payment_method(secret)
            # Other rows on the same page, before and after the erased one.
            for n in range(5):
                await store.insert_payment_method(pm(f"pm_neighbour_{n}"))
            # The control: the value is on disk now, so the test can see it.
            assert erased in _raw_bytes(path)
            assert await ERASURES[erasure](store)
            if when == "after_checkpoint":
                with contextlib.closing(sqlite3.connect(path)) as other:
                    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if when != "after_close":
                assert erased not in _raw_bytes(path)
                assert len(await store.list_payment_methods(ACCT, False, limit=10)) >= 5
        finally:
            await store.close()
        assert erased not in _raw_bytes(path)
        if erasure != "delete":
            # Only the CVC went; the card's ciphertext is still there.
            assert number_ct in _raw_bytes(path)

    asyncio.run(main())


# -- PostgreSQL only -----------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_delete_and_cvc_erasure_remove_the_ciphertext_from_the_table(
    vault_postgres_dsn: str,
) -> None:
    # Only the table's visible contents are checked: the old tuple stays in the heap
    # until VACUUM reclaims it, which is PostgreSQL's business (and out of scope here).
    backend = Backend(
        "postgres", lambda: PostgresVaultStore(vault_postgres_dsn), dsn=vault_postgres_dsn
    )
    number_ct, cvc_ct = secrets.token_bytes(64), secrets.token_bytes(64)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_gone", number_ct=number_ct))
        await store.insert_payment_method(pm("pm_cvc", cvc=cvc_ct, cvc_expires=NOW))
        count = "SELECT count(*) FROM payment_methods WHERE number_ct = ? OR cvc_ct = ?"
        assert await backend.fetch(count, number_ct, cvc_ct) == [(2,)]
        assert await store.delete_payment_method(ACCT, False, "pm_gone")
        assert await store.destroy_cvc(ACCT, False, "pm_cvc")
        assert await backend.fetch(count, number_ct, cvc_ct) == [(0,)]
        assert await backend.fetch(
            "SELECT count(*) FROM payment_methods WHERE id = ?", "pm_gone"
        ) == [(0,)]

    backend.run(check)


# -- open_vault_store ----------------------------------------------------------------------


def test_open_vault_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    for url in (f"sqlite://{tmp_path}/v.db", f"sqlite:///{tmp_path}/v.db"):
        store = open_vault_store(url)
        assert isinstance(store, SQLiteVaultStore)
        assert store.path == tmp_path / "v.db"
    assert isinstance(open_vault_store("postgresql://vault@db.internal/vault"), PostgresVaultStore)
    assert isinstance(open_vault_store("postgres://vault@db.internal/vault"), PostgresVaultStore)
    # Nothing is opened before the first call.
    assert not (tmp_path / "v.db").exists()


@pytest.mark.parametrize(
    "url", ["", "mysql://root:hunter2@db/vault", "sqlite://relative.db", "sqlite:///", "vault.db"]
)
def test_open_vault_store_rejects_other_urls_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_vault_store(url)
    assert "hunter2" not in str(info.value)


# -- CVC use and forwarding requests (migration 2) -------------------------------------


def test_take_cvc_returns_it_once_and_erases_it(backend: Backend) -> None:
    sealed = secrets.token_bytes(40)
    record = pm("pm_take", cvc=sealed, cvc_expires=NOW + 3600)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        assert await store.take_cvc(OTHER, False, "pm_take") is None
        assert await store.take_cvc(ACCT, True, "pm_take") is None
        assert await store.take_cvc(ACCT, False, "pm_take") == TakenCvc(sealed, DK_CVC, NOW + 3600)
        assert await store.take_cvc(ACCT, False, "pm_take") is None
        assert await store.get_payment_method(ACCT, False, "pm_take") == without_cvc(record)

    backend.run(check)


def test_concurrent_take_cvc_gives_the_cvc_to_exactly_one_caller(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(
            pm("pm_race", cvc=secrets.token_bytes(40), cvc_expires=NOW + 60)
        )
        results = await asyncio.gather(*(store.take_cvc(ACCT, False, "pm_race") for _ in range(20)))
        assert sum(r is not None for r in results) == 1

    backend.run(check)


def fwd(
    fwd_id: str, *, created: int = NOW, account_id: str = ACCT, livemode: bool = False
) -> ForwardingRequestRecord:
    return ForwardingRequestRecord(
        id=fwd_id,
        account_id=account_id,
        livemode=livemode,
        created=created,
        payment_method="pm_1",
        url="https://localhost:8445/v1/authorizations",
        destination="acquirer",
        replacements=["card_number", "card_cvc"],
        metadata={"order": "1"},
        request_context={"destination_duration": 12, "destination_ip_address": "127.0.0.1"},
        request_details={
            "body": '{"card":{"number":"424242******4242"}}',
            "headers": [],
            "http_method": "POST",
        },
        response_details={"body": "{}", "headers": [], "status": 200},
    )


def test_forwarding_requests_round_trip_list_and_purge(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        for i in range(5):
            await store.insert_forwarding_request(fwd(f"fwdreq_{i}", created=NOW + i))
        await store.insert_forwarding_request(fwd("fwdreq_live", livemode=True))
        await store.insert_forwarding_request(fwd("fwdreq_other", account_id=OTHER))
        with pytest.raises(DuplicateError):
            await store.insert_forwarding_request(fwd("fwdreq_0"))
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_2") == fwd(
            "fwdreq_2", created=NOW + 2
        )
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_live") is None
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_other") is None
        page = await store.list_forwarding_requests(ACCT, False, limit=2)
        assert [r.id for r in page] == ["fwdreq_4", "fwdreq_3"]
        page = await store.list_forwarding_requests(
            ACCT, False, limit=10, starting_after="fwdreq_3"
        )
        assert [r.id for r in page] == ["fwdreq_2", "fwdreq_1", "fwdreq_0"]
        page = await store.list_forwarding_requests(ACCT, False, limit=2, ending_before="fwdreq_1")
        assert [r.id for r in page] == ["fwdreq_3", "fwdreq_2"]
        assert await store.purge_forwarding_requests(NOW + 2) == 4  # 0, 1, live, other
        remaining = await store.list_forwarding_requests(ACCT, False, limit=10)
        assert [r.id for r in remaining] == ["fwdreq_4", "fwdreq_3", "fwdreq_2"]

    backend.run(check)


# -- idempotency claims: holders, takeovers, stale claims (migration 4) ----------------------


def test_a_held_claim_round_trips_every_field(backend: Backend) -> None:
    first = held("ik_a", "tok-1")

    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.claim_idempotency_key(first) is None
        assert await store.claim_idempotency_key(held("ik_a", "tok-2")) == first

    backend.run(check)


def test_take_over_replaces_the_holder_only_under_the_expected_token(backend: Backend) -> None:
    first = held("ik_a", "tok-1")
    mine = dataclasses.replace(
        first, owner="host-b", boot="boot-9", token="tok-2", lease_until=NOW + 900
    )

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.claim_idempotency_key(first)
        assert not await store.take_over_idempotency_key(mine, "tok-wrong")
        assert await store.claim_idempotency_key(claim("ik_a")) == first
        assert await store.take_over_idempotency_key(mine, "tok-1")
        assert await store.claim_idempotency_key(claim("ik_a")) == mine
        # The old holder's token no longer works for anything.
        assert not await store.take_over_idempotency_key(first, "tok-1")
        assert not await store.complete_idempotency_key(
            ACCT, "test", "ik_a", 200, "pm_x", token="tok-1"
        )
        assert not await store.release_idempotency_key(ACCT, "test", "ik_a", token="tok-1")
        # The request and its effect can be replaced too (another request takes the key).
        renewed = dataclasses.replace(mine, request_hash="r" * 64, effect_id="pm_other")
        assert await store.take_over_idempotency_key(renewed, "tok-2")
        assert await store.claim_idempotency_key(claim("ik_a")) == renewed
        # A finished record is never taken over.
        assert await store.complete_idempotency_key(
            ACCT, "test", "ik_a", 200, "pm_other", token="tok-2"
        )
        assert not await store.take_over_idempotency_key(held("ik_a", "tok-3"), "tok-2")

    backend.run(check)


def test_concurrent_takeovers_from_two_stores_admit_exactly_one(backend: Backend) -> None:
    async def check(first: VaultStore) -> None:
        await seed(first)
        await first.claim_idempotency_key(held("ik_race", "tok-dead"))
        second = backend.open()
        try:
            attempts = [
                (first if n % 2 else second).take_over_idempotency_key(
                    held("ik_race", f"tok-{n}", boot=f"boot-{n}"), "tok-dead"
                )
                for n in range(20)
            ]
            results = await asyncio.gather(*attempts)
        finally:
            await second.close()
        assert sum(results) == 1
        winner = results.index(True)
        stored = await first.claim_idempotency_key(claim("ik_race"))
        assert stored == held("ik_race", f"tok-{winner}", boot=f"boot-{winner}")

    backend.run(check)


def test_complete_and_release_by_the_holder_only(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.claim_idempotency_key(held("ik_a", "tok-1"))
        await store.claim_idempotency_key(held("ik_b", "tok-1"))
        assert not await store.complete_idempotency_key(
            ACCT, "test", "ik_a", 200, "pm_a", token="tok-other"
        )
        assert await store.complete_idempotency_key(
            ACCT, "test", "ik_a", 502, "!forwarding_destination_error", token="tok-1", state=UNKNOWN
        )
        done = await store.claim_idempotency_key(claim("ik_a"))
        assert done is not None
        assert (done.state, done.response_status, done.response_body) == (
            UNKNOWN, 502, "!forwarding_destination_error",
        )  # fmt: skip
        # A finished record is not completed again by its holder.
        assert not await store.complete_idempotency_key(
            ACCT, "test", "ik_a", 200, "pm_a", token="tok-1"
        )
        assert not await store.release_idempotency_key(ACCT, "test", "ik_b", token="tok-other")
        assert await store.release_idempotency_key(ACCT, "test", "ik_b", token="tok-1")
        assert not await store.release_idempotency_key(ACCT, "test", "ik_b", token="tok-1")
        assert await store.claim_idempotency_key(held("ik_b", "tok-2")) is None

    backend.run(check)


def test_stale_claims_are_those_past_their_lease_or_of_a_dead_boot(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        for record in [
            held("ik_expired", "t1", lease_until=NOW - 5),
            held("ik_expired_other_host", "t2", owner="host-b", lease_until=NOW - 1),
            held("ik_dead_boot", "t3", boot="boot-0", lease_until=NOW + 100),
            held("ik_live", "t4", lease_until=NOW + 100),
            held("ik_other_host", "t5", owner="host-b", boot="boot-0", lease_until=NOW + 100),
            held("ik_done", "t6", lease_until=NOW - 5, account_id=OTHER, mode="live"),
        ]:
            await store.claim_idempotency_key(record)
        await store.complete_idempotency_key(OTHER, "live", "ik_done", 200, "pm_x")
        stale = await store.stale_idempotency_claims(NOW, "host-a", "boot-1", limit=10)
        # Oldest lease first.
        assert [r.key for r in stale] == ["ik_expired", "ik_expired_other_host", "ik_dead_boot"]
        assert stale[0] == held("ik_expired", "t1", lease_until=NOW - 5)
        assert len(await store.stale_idempotency_claims(NOW, "host-a", "boot-1", limit=2)) == 2

    backend.run(check)


# -- the CVC taken for a forward and put back; forwards' outcomes (migration 4) -------------


def pending_fwd(fwd_id: str, pm_id: str = "pm_take", **changes: Any) -> ForwardingRequestRecord:
    record = dataclasses.replace(
        fwd(fwd_id),
        payment_method=pm_id,
        outcome=PENDING,
        request_context={},
        response_details={},
    )
    return dataclasses.replace(record, **changes)


def test_restore_cvc_puts_it_back_exactly_as_taken(backend: Backend) -> None:
    record = pm("pm_take", cvc=secrets.token_bytes(40), cvc_expires=NOW + 3600)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        taken = await store.take_cvc(ACCT, False, "pm_take")
        assert taken is not None
        assert not await store.restore_cvc(OTHER, False, "pm_take", taken)
        assert not await store.restore_cvc(ACCT, False, "pm_gone", taken)
        assert await store.restore_cvc(ACCT, False, "pm_take", taken)
        assert await store.get_payment_method(ACCT, False, "pm_take") == record
        # Never over a CVC that is there.
        assert not await store.restore_cvc(ACCT, False, "pm_take", TakenCvc(b"x" * 40, DK_CVC, NOW))
        assert await store.get_payment_method(ACCT, False, "pm_take") == record

    backend.run(check)


def test_take_cvc_for_forward_stores_the_forward_and_takes_the_cvc_together(
    backend: Backend,
) -> None:
    sealed = secrets.token_bytes(40)
    record = pm("pm_take", cvc=sealed, cvc_expires=NOW + 3600)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        assert await store.take_cvc_for_forward(pending_fwd("fwdreq_1")) == TakenCvc(
            sealed, DK_CVC, NOW + 3600
        )
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_1") == pending_fwd(
            "fwdreq_1"
        )
        assert await store.get_payment_method(ACCT, False, "pm_take") == without_cvc(record)
        # No CVC left: nothing is written.
        assert await store.take_cvc_for_forward(pending_fwd("fwdreq_2")) is None
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_2") is None
        # An id that exists: nothing is written, the CVC stays.
        await store.insert_payment_method(pm("pm_two", cvc=sealed, cvc_expires=NOW + 60))
        with pytest.raises(DuplicateError):
            await store.take_cvc_for_forward(pending_fwd("fwdreq_1", pm_id="pm_two"))
        two = await store.get_payment_method(ACCT, False, "pm_two")
        assert two is not None
        assert two.cvc_ct == sealed

    backend.run(check)


def test_a_forward_is_written_only_once_its_after_has_succeeded(backend: Backend) -> None:
    """``after`` (a forward's audit record): the pending row, and the CVC taken with it,
    are written only once it has succeeded; never when it fails (issue 21)."""
    sealed = secrets.token_bytes(40)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_take", cvc=sealed, cvc_expires=NOW + 3600))
        loop = asyncio.get_running_loop()

        # Settled in the same pass (as the audit log's flush does) or later: written.
        soon: asyncio.Future[None] = loop.create_future()
        loop.call_soon(soon.set_result, None)
        await store.insert_forwarding_request(pending_fwd("fwdreq_1"), after=soon)
        late: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.05, late.set_result, None)
        taken = await store.take_cvc_for_forward(pending_fwd("fwdreq_2"), after=late)
        assert taken == TakenCvc(sealed, DK_CVC, NOW + 3600)
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_2") is not None

        # Failed, at once or later: nothing written, the CVC stays.
        await store.insert_payment_method(pm("pm_two", cvc=sealed, cvc_expires=NOW + 60))
        for delay in (0.0, 0.05):
            failed: asyncio.Future[None] = loop.create_future()
            loop.call_later(delay, failed.set_exception, OSError("the audit log failed"))
            with pytest.raises(PreconditionFailed):
                await store.take_cvc_for_forward(
                    pending_fwd("fwdreq_3", pm_id="pm_two"), after=failed
                )
            with pytest.raises(PreconditionFailed):
                await store.insert_forwarding_request(pending_fwd("fwdreq_4"), after=failed)
            with pytest.raises(OSError):
                await failed
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_3") is None
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_4") is None
        two = await store.get_payment_method(ACCT, False, "pm_two")
        assert two is not None
        assert two.cvc_ct == sealed
        # A write without after, queued beside one that waits, is not held back by it.
        waiting: asyncio.Future[None] = loop.create_future()
        held = asyncio.ensure_future(
            store.insert_forwarding_request(pending_fwd("fwdreq_5"), after=waiting)
        )
        await store.insert_forwarding_request(pending_fwd("fwdreq_6"))
        assert not held.done()
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_5") is None
        waiting.set_result(None)
        await held
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_5") is not None

    backend.run(check)


def test_concurrent_forwards_take_the_cvc_once(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_take", cvc=secrets.token_bytes(40)))
        results = await asyncio.gather(
            *(store.take_cvc_for_forward(pending_fwd(f"fwdreq_{n}")) for n in range(12))
        )
        assert sum(r is not None for r in results) == 1
        stored = await store.list_forwarding_requests(ACCT, False, limit=20)
        assert len(stored) == 1

    backend.run(check)


def test_a_pending_forward_is_completed_once(backend: Backend) -> None:
    context = {"destination_duration": 3, "destination_ip_address": "127.0.0.1"}
    response = {"body": '{"ok":true}', "headers": [], "status": 200}

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_forwarding_request(pending_fwd("fwdreq_1"))
        await store.insert_forwarding_request(pending_fwd("fwdreq_2"))
        assert not await store.complete_forwarding_request(
            OTHER, False, "fwdreq_1", COMPLETED, context, response
        )
        assert await store.complete_forwarding_request(
            ACCT, False, "fwdreq_1", COMPLETED, context, response
        )
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_1") == pending_fwd(
            "fwdreq_1", outcome=COMPLETED, request_context=context, response_details=response
        )
        # Settled: never again (an "unknown" after it changes nothing).
        assert not await store.complete_forwarding_request(ACCT, False, "fwdreq_1", UNKNOWN)
        assert await store.complete_forwarding_request(ACCT, False, "fwdreq_2", UNKNOWN)
        second = await store.get_forwarding_request(ACCT, False, "fwdreq_2")
        assert second == pending_fwd("fwdreq_2", outcome=UNKNOWN)

    backend.run(check)


def test_cancel_deletes_a_pending_forward_and_restores_its_cvc_together(
    backend: Backend,
) -> None:
    record = pm("pm_take", cvc=secrets.token_bytes(40), cvc_expires=NOW + 3600)

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(record)
        taken = await store.take_cvc_for_forward(pending_fwd("fwdreq_1"))
        assert taken is not None
        assert not await store.cancel_forwarding_request(ACCT, True, "fwdreq_1", taken)
        assert await store.cancel_forwarding_request(ACCT, False, "fwdreq_1", taken)
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_1") is None
        assert await store.get_payment_method(ACCT, False, "pm_take") == record
        # Only a pending forward: a completed one stays, and no CVC comes back.
        taken = await store.take_cvc_for_forward(pending_fwd("fwdreq_2"))
        assert taken is not None
        assert await store.complete_forwarding_request(ACCT, False, "fwdreq_2", UNKNOWN)
        assert not await store.cancel_forwarding_request(ACCT, False, "fwdreq_2", taken)
        assert await store.get_payment_method(ACCT, False, "pm_take") == without_cvc(record)
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_2") is not None
        # Without a CVC to restore.
        await store.insert_forwarding_request(pending_fwd("fwdreq_3"))
        assert await store.cancel_forwarding_request(ACCT, False, "fwdreq_3", None)
        assert await store.get_forwarding_request(ACCT, False, "fwdreq_3") is None

    backend.run(check)


def test_pending_forwards_are_listed_oldest_first_across_accounts(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_forwarding_request(pending_fwd("fwdreq_new", created=NOW + 10))
        await store.insert_forwarding_request(pending_fwd("fwdreq_old", created=NOW - 10))
        await store.insert_forwarding_request(
            pending_fwd("fwdreq_other", created=NOW - 5, account_id=OTHER, livemode=True)
        )
        await store.insert_forwarding_request(fwd("fwdreq_done", created=NOW - 20))
        found = await store.pending_forwarding_requests(NOW, limit=10)
        assert [r.id for r in found] == ["fwdreq_old", "fwdreq_other"]
        assert found[0] == pending_fwd("fwdreq_old", created=NOW - 10)
        assert len(await store.pending_forwarding_requests(NOW + 60, limit=2)) == 2

    backend.run(check)


# -- the lead of the periodic jobs -----------------------------------------------------


def test_one_store_of_those_sharing_a_database_leads_the_jobs_and_another_takes_over(
    backend: Backend,
) -> None:
    """PostgreSQL: of the stores sharing the database one leads, until it is closed or
    its lock connection is ended by the server; then the next call of another takes the
    lead, and the one that lost it knows. SQLite: one process per file, always the lead."""

    async def check(first: VaultStore) -> None:
        second, third = backend.open(), backend.open()
        try:
            if backend.name == "sqlite":
                assert [await s.lead_jobs() for s in (first, second, first)] == [True] * 3
                return
            assert await first.lead_jobs()
            assert not await second.lead_jobs()
            assert await first.lead_jobs()  # kept
            assert not await second.lead_jobs()  # tried again, still held
            # One holder, seen from the server, on a connection of its own.
            holders = await backend.fetch(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "USING (pid) WHERE l.locktype = 'advisory' AND l.objid = ? AND l.granted "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                7303,
            )
            assert len(holders) == 1 and str(holders[0][0]).startswith("cardvault-jobs ")
            await first.close()  # gives the lead up
            assert await second.lead_jobs()
            assert not await third.lead_jobs()
            # The server ends the leader's connection (as it does when its process dies).
            await backend.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objid = ? AND granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())",
                7303,
            )
            assert await third.lead_jobs()
            with contextlib.suppress(StoreUnavailable):
                assert not await second.lead_jobs()  # lost, and not taken back
            assert not await second.lead_jobs()
            assert await third.lead_jobs()
        finally:
            await second.close()
            await third.close()

    backend.run(check)
