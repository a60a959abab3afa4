"""The KeyStore contract: every implementation must pass this one suite.

Each test runs once on :class:`SQLiteKeyStore` and once on :class:`PostgresKeyStore`
(a fresh database per test on the server at 127.0.0.1:5432; CI starts it, so an
unreachable server is a failure, not a skip). Store methods are async and asyncpg's
pool belongs to the event loop that made it, so each ``Backend.run`` opens a new store
object in a new event loop, runs one check and closes the store. Two runs in one test
are two "processes" sharing the same file or database.

The tests under "databases of the first release" build a key-service database the way
the key service's first store (``keyservice/store.py``, before the storage layer was
one) did, from its own CREATE statements, and open it with today's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cardvault.errors import ConfigurationError
from cardvault.storage import (
    DuplicateError,
    KekExists,
    KeyStore,
    PostgresKeyStore,
    SQLiteKeyStore,
    StoredKek,
    open_key_store,
)
from cardvault.storage.migrations import KEY_SCHEMA

#: The server CI starts; trust authentication for the ``postgres`` role.
POSTGRES_ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)

Check = Callable[[KeyStore], Awaitable[None]]


@dataclass
class Backend:
    name: str
    open: Callable[[], KeyStore]
    #: The SQLite file, or the PostgreSQL DSN, for looking under the store.
    path: Path | None = None
    dsn: str | None = None

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

    def script(self, statements: Sequence[str]) -> None:
        """Run ``statements`` in one committed transaction past the store (between two
        runs, when no store is open)."""
        self._past_the_store(statements)

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of one query, read past the store."""
        return self._past_the_store([sql])

    def _past_the_store(self, statements: Sequence[str]) -> list[tuple[Any, ...]]:
        if self.path is not None:
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                return [row for sql in statements for row in conn.execute(sql).fetchall()]

        async def postgres() -> list[tuple[Any, ...]]:
            import asyncpg

            conn = await asyncpg.connect(self.dsn)
            try:
                async with conn.transaction():
                    return [tuple(row) for sql in statements for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(postgres())


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
        return Backend("sqlite", lambda: SQLiteKeyStore(path), path=path)
    dsn = request.getfixturevalue("postgres_dsn")
    return Backend("postgres", lambda: PostgresKeyStore(dsn), dsn=dsn)


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


def test_replace_seal_moves_every_kek_and_the_meta_in_one_transaction(backend: Backend) -> None:
    """A reseal (``keyservice reseal``) replaces the sealed form of every stored KEK
    version and the seal's metadata together, or nothing: a list that leaves a stored
    version out, or names one not stored, changes nothing."""
    first = [kek("pan", 1), kek("pan", 2), kek("cvc", 1)]

    async def check(store: KeyStore) -> None:
        for k in first:
            await store.add_kek(k)
        await store.set_meta("seal", "old")
        await store.set_meta("root_kcv", "kcv-old")
        await store.set_meta("other", "kept")
        before = await store.list_keks()
        resealed = [dataclasses.replace(k, sealed=b"new-" + k.sealed) for k in first]
        for wrong in (resealed[:2], [*resealed, kek("fingerprint", 1)]):
            with pytest.raises(ValueError, match="every stored KEK"):
                await store.replace_seal(wrong, {"seal": "new", "root_kcv": "kcv-new"})
            assert await store.list_keks() == before
            assert await store.get_meta("seal") == "old"
            assert await store.get_meta("root_kcv") == "kcv-old"
        await store.replace_seal(resealed, {"seal": "new", "root_kcv": "kcv-new"})
        after = {(k.name, k.version): k for k in await store.list_keks()}
        assert after == {(k.name, k.version): k for k in resealed}
        assert await store.get_meta("seal") == "new"
        assert await store.get_meta("root_kcv") == "kcv-new"
        assert await store.get_meta("other") == "kept"

    backend.run(check)

    async def reopened(store: KeyStore) -> None:  # a new store on the same database
        assert await store.get_meta("seal") == "new"
        assert {k.sealed[:4] for k in await store.list_keks()} == {b"new-"}

    backend.run(reopened)


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


def test_migrate_from_two_stores_at_once_applies_each_version_once(backend: Backend) -> None:
    async def check(first: KeyStore) -> None:
        second = backend.open()
        try:
            await asyncio.gather(first.migrate(), second.migrate())
            await second.set_meta("seal", "shamir")
            assert await first.get_meta("seal") == "shamir"
        finally:
            await second.close()

    backend.run(check, migrate=False)
    versions = backend.fetch("SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, KEY_SCHEMA.latest + 1))


def test_a_duplicate_kek_is_a_duplicate_error_of_the_storage_layer() -> None:
    assert issubclass(KekExists, DuplicateError)


# -- databases of the first release ----------------------------------------------------
#
# The key service's first store created its schema with these statements, to the letter,
# turning BYTEA into BLOB on SQLite and the events' id into a BIGSERIAL on PostgreSQL,
# and kept the applied versions in a one-column schema_version table.

FIRST_RELEASE_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS keks (
        name TEXT NOT NULL, version INTEGER NOT NULL, sealed BYTEA NOT NULL,
        created BIGINT NOT NULL, PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS key_config (
        name TEXT PRIMARY KEY, min_decryption_version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY, at BIGINT NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL)""",
]
FIRST_RELEASE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
KEY_TABLES = ("events", "keks", "key_config", "meta")

FIRST_RELEASE_KEKS = [
    StoredKek("cvc", 1, bytes(range(76)), 1_700_000_001),
    StoredKek("pan", 1, b"\x00" * 76, 1_700_000_000),
    StoredKek("pan", 2, b"\xff" * 76, 1_700_000_500),
]


def first_release_schema(backend: Backend) -> list[str]:
    if backend.name == "sqlite":
        return [s.replace("BYTEA", "BLOB") for s in FIRST_RELEASE_SCHEMA]
    return [
        s.replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
        for s in FIRST_RELEASE_SCHEMA
    ]


def hex_literal(backend: Backend, value: bytes) -> str:
    return f"X'{value.hex()}'" if backend.name == "sqlite" else f"'\\x{value.hex()}'::bytea"


def kek_insert(backend: Backend, k: StoredKek) -> str:
    values = f"'{k.name}', {k.version:d}, {hex_literal(backend, k.sealed)}, {k.created:d}"
    return f"INSERT INTO keks (name, version, sealed, created) VALUES ({values})"  # noqa: S608


def make_first_release_database(backend: Backend, versions: Sequence[int] | None) -> None:
    """A key-service database as the first release left it after ``initialize`` and a
    rotation: its tables and rows, and ``versions`` in its one-column schema_version
    table (None: no such table)."""
    statements = first_release_schema(backend)
    if versions is not None:
        statements.append(FIRST_RELEASE_VERSION_TABLE)
        statements += [f"INSERT INTO schema_version VALUES ({v:d})" for v in versions]  # noqa: S608
    statements += [
        "INSERT INTO meta (key, value) VALUES ('seal', '{\"type\": \"shamir\"}')",
        "INSERT INTO meta (key, value) VALUES ('root_kcv', '00ff00ff00ff00ff')",
        *(kek_insert(backend, k) for k in FIRST_RELEASE_KEKS),
        "INSERT INTO key_config (name, min_decryption_version) VALUES ('pan', 2)",
        "INSERT INTO events (at, actor, action, result, detail) "
        "VALUES (1700000000000, 'cli', 'init', 'ok', '{}')",
        "INSERT INTO events (at, actor, action, result, detail) "
        "VALUES (1700000500000, 'admin', 'rotate', 'ok', 'pan v2')",
    ]
    backend.script(statements)


@pytest.mark.parametrize(
    "versions",
    [[1], [1, 1], None],
    ids=["version-table", "version-recorded-twice", "no-version-table"],
)
def test_a_database_of_the_first_release_opens_with_everything_in_it(
    backend: Backend, versions: list[int] | None
) -> None:
    # [1, 1]: two processes migrating the first release's store at once could both
    # record version 1. None: its tables without a version table.
    make_first_release_database(backend, versions)

    async def read(store: KeyStore) -> None:
        assert await store.get_meta("seal") == '{"type": "shamir"}'
        assert await store.get_meta("root_kcv") == "00ff00ff00ff00ff"
        assert await store.list_keks() == FIRST_RELEASE_KEKS
        assert await store.min_decryption_versions() == {"pan": 2}
        events = await store.events()
        assert [(e["at"], e["action"], e["detail"]) for e in events] == [
            (1_700_000_000_000, "init", "{}"),
            (1_700_000_500_000, "rotate", "pan v2"),
        ]

    async def write(store: KeyStore) -> None:
        with pytest.raises(KekExists):
            await store.add_kek(StoredKek("pan", 2, b"\x01" * 76, 1_700_000_900))
        await store.add_kek(StoredKek("pan", 3, b"\x02" * 76, 1_700_000_900))
        await store.append_event("admin", "rotate", "ok", "pan v3")
        assert [e["detail"] for e in await store.events()] == ["{}", "pan v2", "pan v3"]

    backend.run(read)
    backend.run(write)
    # Version 1 is recorded once, in the form every store's runner keeps, and the first
    # release's own check (the newest version) still reads it.
    recorded = backend.fetch("SELECT version, applied FROM schema_version ORDER BY version")
    assert [v for v, _ in recorded] == [1]
    if versions is not None:
        assert recorded == [(1, 0)]  # when it was applied is not known
    assert backend.fetch("SELECT max(version) FROM schema_version") == [(1,)]
    assert not [t for (t,) in backend.fetch(_TABLES_SQL[backend.name]) if t == "schema_version_v0"]


_TABLES_SQL = {
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
    "postgres": "SELECT table_name FROM information_schema.tables "
    "WHERE table_schema = current_schema()",
}

_DESCRIBE_SQL = {
    "sqlite": [
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE tbl_name IN ('events', 'keks', 'key_config', 'meta') ORDER BY name"
    ],
    "postgres": [
        "SELECT table_name, column_name, data_type, is_nullable, column_default, "
        "collation_name, ordinal_position FROM information_schema.columns "
        "WHERE table_schema = current_schema() "
        "AND table_name IN ('events', 'keks', 'key_config', 'meta') "
        "ORDER BY table_name, ordinal_position",
        "SELECT tc.table_name, tc.constraint_type, kcu.column_name, kcu.ordinal_position "
        "FROM information_schema.table_constraints tc "
        "JOIN information_schema.key_column_usage kcu "
        "ON kcu.constraint_schema = tc.constraint_schema "
        "AND kcu.constraint_name = tc.constraint_name "
        "WHERE tc.table_schema = current_schema() "
        "AND tc.table_name IN ('events', 'keks', 'key_config', 'meta') "
        "ORDER BY tc.table_name, tc.constraint_type, kcu.ordinal_position",
    ],
}


def describe_key_tables(backend: Backend) -> list[tuple[Any, ...]]:
    """The key tables' definitions, white space folded."""
    described = [row for sql in _DESCRIBE_SQL[backend.name] for row in backend.fetch(sql)]
    return [
        tuple(" ".join(v.split()) if isinstance(v, str) else v for v in row) for row in described
    ]


def test_version_1_is_the_schema_of_the_first_release(backend: Backend) -> None:
    make_first_release_database(backend, [1])
    first_release = describe_key_tables(backend)
    assert first_release  # the description sees the tables
    backend.script([f"DROP TABLE {t}" for t in (*KEY_TABLES, "schema_version")])

    async def nothing(store: KeyStore) -> None:
        pass

    backend.run(nothing)  # a new database, made by today's store
    assert describe_key_tables(backend) == first_release


# -- files and URLs --------------------------------------------------------------------


def test_sqlite_key_store_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "keyd.db"

    async def check(store: KeyStore) -> None:
        await store.set_meta("seal", "shamir")
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    old = os.umask(0)
    try:
        Backend("sqlite", lambda: SQLiteKeyStore(path), path=path).run(check)
    finally:
        os.umask(old)


def test_open_key_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    for url in (f"sqlite://{tmp_path}/keyd.db", f"sqlite:///{tmp_path}/keyd.db"):
        store = open_key_store(url)
        assert isinstance(store, SQLiteKeyStore)
        assert store.path == tmp_path / "keyd.db"
    assert isinstance(open_key_store("postgresql://keyd@db.internal/keyd"), PostgresKeyStore)
    assert isinstance(open_key_store("postgres://keyd@db.internal/keyd"), PostgresKeyStore)
    # Nothing is opened before the first call.
    assert not (tmp_path / "keyd.db").exists()


@pytest.mark.parametrize(
    "url", ["", "mysql://root:hunter2@db/keyd", "sqlite://relative.db", "sqlite:///", "keyd.db"]
)
def test_open_key_store_rejects_other_urls_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_key_store(url)
    assert "hunter2" not in str(info.value)
