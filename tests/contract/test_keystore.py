"""The KeyStore contract: every implementation must pass this one suite.

Each test runs once on :class:`SQLiteKeyStore` and once on :class:`PostgresKeyStore`
(a fresh database per test on the server at 127.0.0.1:5432; CI starts it, so an
unreachable server is a failure, not a skip). Store methods are async and asyncpg's
pool belongs to the event loop that made it, so each ``Backend.run`` opens a new store
object in a new event loop, runs one check and closes the store. Two runs in one test
are two "processes" sharing the same file or database.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cardvault.keyservice.store import (
    KekExists,
    KeyStore,
    PostgresKeyStore,
    SQLiteKeyStore,
    StoredKek,
)

#: The server CI starts; trust authentication for the ``postgres`` role.
POSTGRES_ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)

Check = Callable[[KeyStore], Awaitable[None]]


@dataclass
class Backend:
    name: str
    open: Callable[[], KeyStore]

    def run(self, check: Check, *, migrate: bool = True) -> None:
        """Open a new store in a new event loop, migrate, run ``check``, close."""

        async def main() -> None:
            store = self.open()
            try:
                if migrate:
                    await store.migrate()
                await check(store)
            finally:
                await store.close()

        asyncio.run(main())


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
def postgres_dsn() -> Iterator[str]:
    """A DSN for a database created for this test alone, dropped afterwards."""
    name = f"keyd_test_{secrets.token_hex(6)}"
    asyncio.run(_admin_execute(f"CREATE DATABASE {name}"))
    try:
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        # FORCE ends a connection a failed test may have left open.
        asyncio.run(_admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "k.db"
        return Backend("sqlite", lambda: SQLiteKeyStore(path))
    dsn = request.getfixturevalue("postgres_dsn")
    return Backend("postgres", lambda: PostgresKeyStore(dsn))


def kek(
    name: str, version: int, sealed: bytes | None = None, created: int = 1_700_000_000
) -> StoredKek:
    return StoredKek(
        name, version, sealed if sealed is not None else secrets.token_bytes(76), created
    )


# -- migrations ------------------------------------------------------------------------


def test_migrate_twice_is_harmless_and_keeps_data(backend: Backend) -> None:
    stored = kek("pan", 1)

    async def check(store: KeyStore) -> None:
        await store.migrate()
        await store.set_meta("seal", "shamir")
        await store.add_kek(stored)
        await store.append_event("cli", "init", "ok", "")
        await store.migrate()
        await store.migrate()
        assert await store.get_meta("seal") == "shamir"
        assert await store.list_keks() == [stored]
        assert [e["action"] for e in await store.events()] == ["init"]

    backend.run(check, migrate=False)


def test_migrate_on_an_existing_store_from_another_process_keeps_data(backend: Backend) -> None:
    async def write(store: KeyStore) -> None:
        await store.set_meta("k", "v")

    async def read(store: KeyStore) -> None:
        assert await store.get_meta("k") == "v"

    backend.run(write)
    backend.run(read)  # migrates again first


# -- meta ------------------------------------------------------------------------------


def test_get_meta_returns_none_for_a_missing_key(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        assert await store.get_meta("root_kcv") is None

    backend.run(check)


def test_set_meta_stores_and_replaces_one_key_only(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        await store.set_meta("seal", '{"type": "shamir"}')
        await store.set_meta("root_kcv", "0123456789abcdef")
        assert await store.get_meta("seal") == '{"type": "shamir"}'
        await store.set_meta("seal", '{"type": "dev"}')
        assert await store.get_meta("seal") == '{"type": "dev"}'
        assert await store.get_meta("root_kcv") == "0123456789abcdef"

    backend.run(check)


def test_set_meta_keeps_unicode_and_empty_values_exactly(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        await store.set_meta("empty", "")
        await store.set_meta("text", "clé – ключ 🔑\nline two")
        assert await store.get_meta("empty") == ""
        assert await store.get_meta("text") == "clé – ключ 🔑\nline two"

    backend.run(check)


# -- KEKs ------------------------------------------------------------------------------


def test_list_keks_is_empty_on_a_new_store(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        assert await store.list_keks() == []

    backend.run(check)


def test_list_keks_orders_by_name_then_numeric_version(backend: Backend) -> None:
    added = [
        kek("pan", 10),
        kek("fingerprint", 1),
        kek("pan", 2),
        kek("cvc", 1),
        kek("pan", 1),
        kek("cvc", 3),
    ]

    async def check(store: KeyStore) -> None:
        for k in added:
            await store.add_kek(k)
        listed = await store.list_keks()
        assert [(k.name, k.version) for k in listed] == [
            ("cvc", 1),
            ("cvc", 3),
            ("fingerprint", 1),
            ("pan", 1),
            ("pan", 2),
            ("pan", 10),
        ]
        assert sorted(listed, key=lambda k: (k.name, k.version)) == listed
        assert {(k.name, k.version): k for k in listed} == {(k.name, k.version): k for k in added}

    backend.run(check)


def test_add_kek_keeps_sealed_bytes_and_created_exactly(backend: Backend) -> None:
    # Every byte value, NULs included, and a created time past 2**31 (a BIGINT).
    stored = kek("pan", 1, sealed=bytes(range(256)) + b"\x00\x00", created=2**40 + 7)

    async def check(store: KeyStore) -> None:
        await store.add_kek(stored)
        (back,) = await store.list_keks()
        assert back == stored
        assert type(back.sealed) is bytes

    backend.run(check)


def test_add_kek_refuses_a_duplicate_name_and_version(backend: Backend) -> None:
    first = kek("pan", 1)

    async def check(store: KeyStore) -> None:
        await store.add_kek(first)
        with pytest.raises(KekExists):
            await store.add_kek(kek("pan", 1))
        # The stored version is untouched, and other names and versions still add.
        await store.add_kek(kek("pan", 2))
        await store.add_kek(kek("cvc", 1))
        listed = await store.list_keks()
        assert [(k.name, k.version) for k in listed] == [("cvc", 1), ("pan", 1), ("pan", 2)]
        assert listed[1] == first

    backend.run(check)


def test_add_kek_refuses_a_duplicate_after_reopen(backend: Backend) -> None:
    async def write(store: KeyStore) -> None:
        await store.add_kek(kek("pan", 1))

    async def duplicate(store: KeyStore) -> None:
        with pytest.raises(KekExists):
            await store.add_kek(kek("pan", 1))

    backend.run(write)
    backend.run(duplicate)


# -- min_decryption_version ------------------------------------------------------------


def test_min_decryption_versions_start_empty_and_persist_per_key(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        assert await store.min_decryption_versions() == {}
        await store.set_min_decryption_version("pan", 2)
        await store.set_min_decryption_version("cvc", 3)
        assert await store.min_decryption_versions() == {"pan": 2, "cvc": 3}
        await store.set_min_decryption_version("pan", 4)
        await store.set_min_decryption_version("cvc", 1)  # lowering is allowed too
        assert await store.min_decryption_versions() == {"pan": 4, "cvc": 1}

    backend.run(check)


# -- events ----------------------------------------------------------------------------


def test_events_are_empty_on_a_new_store(backend: Backend) -> None:
    async def check(store: KeyStore) -> None:
        assert await store.events() == []

    backend.run(check)


def test_append_event_keeps_order_and_fields(backend: Backend) -> None:
    # More events than fit in one millisecond: the order must not come from the clock.
    appended = [
        ("admin", "unseal_share", "accepted" if i % 3 else "rejected", f"index={i}")
        for i in range(40)
    ]

    async def check(store: KeyStore) -> None:
        before = int(time.time() * 1000)
        for event in appended:
            await store.append_event(*event)
        after = int(time.time() * 1000)
        events = await store.events()
        assert [(e["actor"], e["action"], e["result"], e["detail"]) for e in events] == appended
        assert all(set(e) == {"at", "actor", "action", "result", "detail"} for e in events)
        # ``at`` is milliseconds since the epoch, never going backwards.
        stamps = [e["at"] for e in events]
        assert all(isinstance(at, int) for at in stamps)
        assert before - 1000 <= stamps[0] and stamps[-1] <= after + 1000
        assert stamps == sorted(stamps)

    backend.run(check)


# -- durability ------------------------------------------------------------------------


def test_everything_persists_after_close_and_reopen(backend: Backend) -> None:
    keks = [kek("pan", 1), kek("pan", 2), kek("fingerprint", 1)]

    async def write(store: KeyStore) -> None:
        await store.set_meta("seal", "shamir")
        await store.set_meta("root_kcv", "00ff00ff00ff00ff")
        for k in keks:
            await store.add_kek(k)
        await store.set_min_decryption_version("pan", 2)
        await store.append_event("cli", "init", "ok", "detail one")
        await store.append_event("service", "start", "sealed", "")

    async def read(store: KeyStore) -> None:
        assert await store.get_meta("seal") == "shamir"
        assert await store.get_meta("root_kcv") == "00ff00ff00ff00ff"
        assert await store.list_keks() == sorted(keks, key=lambda k: (k.name, k.version))
        assert await store.min_decryption_versions() == {"pan": 2}
        events = await store.events()
        assert [(e["actor"], e["action"], e["result"], e["detail"]) for e in events] == [
            ("cli", "init", "ok", "detail one"),
            ("service", "start", "sealed", ""),
        ]

    async def append_more(store: KeyStore) -> None:
        await store.append_event("service", "start", "sealed", "again")
        assert [e["detail"] for e in await store.events()] == ["detail one", "", "again"]

    backend.run(write)
    backend.run(read)
    backend.run(append_more)  # ids keep increasing across reopen
