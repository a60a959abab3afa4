"""A database that cannot be reached or cannot take a write is one exception.

Every store, on either backend, raises :class:`~cardvault.storage.StoreUnavailable`
(503 ``database_unavailable``; :class:`~cardvault.storage.StoreFull`, 503
``storage_full``, for a full disk) with the driver's exception as its cause, never a
bare asyncpg or sqlite3 exception, and works again by itself once the database is back.

PostgreSQL: the test's own database on the server at 127.0.0.1:5432 (CI starts it, so
an unreachable server is a failure); its connections are ended with
``pg_terminate_backend`` or refused with ``ALLOW_CONNECTIONS false``, never by stopping
the server. SQLite: a full disk is the database's ``max_page_count`` reached on the
store's own connection, or (as root) a real tmpfs filled up; a lock held by another
process past the busy timeout; a file that cannot be opened.

Each check runs in one ``asyncio.run`` (asyncpg's pool belongs to its event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cardvault.errors import DatabaseUnavailable, StorageFull
from cardvault.storage import (
    Account,
    DataKeyRecord,
    PaymentMethodRecord,
    PostgresKeyStore,
    PostgresVaultStore,
    SQLiteKeyStore,
    SQLiteVaultStore,
    StoredKek,
    StoreFull,
    StoreUnavailable,
)
from cardvault.storage.sqlite import writer as sqlite_writer

POSTGRES_ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)

ACCT = "acct_1Alpha"
DK = "dk_pan_1"
NOW = 1_760_000_000


def pm(pm_id: str, **changes: Any) -> PaymentMethodRecord:
    record = PaymentMethodRecord(
        id=pm_id,
        account_id=ACCT,
        livemode=False,
        created=NOW,
        data_key_id=DK,
        number_ct=b"\x01" * 60,
        brand="visa",
        last4="4242",
        exp_month=12,
        exp_year=2034,
        funding="credit",
        fingerprint="fp_" + pm_id,
    )
    return dataclasses.replace(record, **changes)


async def seed(store: SQLiteVaultStore | PostgresVaultStore) -> None:
    await store.migrate()
    await store.create_account(Account(ACCT, "Alpha Shop", NOW))
    await store.insert_data_key(DataKeyRecord(DK, "pan", 1, b"\x02" * 40, NOW))


def assert_unavailable(exc: BaseException, *reasons: str) -> None:
    """``exc`` is the storage layer's 503, for one of ``reasons``, with its cause kept."""
    assert isinstance(exc, StoreUnavailable), repr(exc)
    assert isinstance(exc, DatabaseUnavailable)
    assert exc.reason in reasons, exc.reason
    assert exc.http_status == 503
    assert exc.__cause__ is not None
    if isinstance(exc, StoreFull):
        assert exc.code == "storage_full"
        assert exc.headers == {"Retry-After": str(StorageFull.retry_after)}
    else:
        assert exc.code == "database_unavailable"
        assert exc.headers == {"Retry-After": str(DatabaseUnavailable.retry_after)}


# -- PostgreSQL -----------------------------------------------------------------------------


async def _admin(sql: str, *args: Any) -> Any:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {POSTGRES_ADMIN_DSN} ({type(exc).__name__}: {exc})",
            pytrace=False,
        )
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@dataclasses.dataclass
class PgDatabase:
    name: str
    dsn: str

    async def terminate(self, *, waiting_on_a_lock: bool = False) -> int:
        """End the database's connections (those waiting on a lock only, if asked),
        as an administrator or a failover would; the number ended."""
        ended: int = await _admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid() "
            "AND (NOT $2 OR wait_event_type = 'Lock')",
            self.name,
            waiting_on_a_lock,
        )
        return ended

    async def waiting_on_a_lock(self, count: int = 1) -> None:
        """Until ``count`` of the database's connections wait on a lock."""
        for _ in range(500):
            waiting = await _admin(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = $1 AND wait_event_type = 'Lock'",
                self.name,
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the store's statement never waited on the lock")

    async def allow_connections(self, allowed: bool) -> None:
        await _admin(f"ALTER DATABASE {self.name} WITH ALLOW_CONNECTIONS {str(allowed).lower()}")

    @contextlib.asynccontextmanager
    async def locked(self, table: str) -> AsyncIterator[None]:
        """``table`` locked against every other connection until the block ends."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                yield
        finally:
            await conn.close()


@pytest.fixture
def pg() -> Iterator[PgDatabase]:
    name = f"unavail_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield PgDatabase(name, POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}")
    finally:
        asyncio.run(_admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"))
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def pg_run(check: Callable[[PostgresVaultStore], Awaitable[None]], dsn: str, **kw: Any) -> None:
    async def main() -> None:
        store = PostgresVaultStore(dsn, **kw)
        try:
            await seed(store)
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.postgres
def test_postgres_a_write_whose_connection_is_terminated_is_store_unavailable_then_works(
    pg: PgDatabase,
) -> None:
    async def check(store: PostgresVaultStore) -> None:
        async with pg.locked("accounts"):
            write = asyncio.ensure_future(store.set_allowed_origins(ACCT, ["https://a.example"]))
            await pg.waiting_on_a_lock()
            assert await pg.terminate(waiting_on_a_lock=True) == 1
            with pytest.raises(StoreUnavailable) as info:
                await write
        # pg_terminate_backend: "terminating connection due to administrator command".
        assert_unavailable(info.value, "shutdown", "connection_lost")
        # The pool replaces the connection: the next call works, no restart.
        assert await store.set_allowed_origins(ACCT, ["https://b.example"])
        account = await store.get_account(ACCT)
        assert account is not None
        assert account.allowed_origins == ("https://b.example",)

    pg_run(check, pg.dsn)


@pytest.mark.postgres
def test_postgres_a_read_whose_connection_is_terminated_is_store_unavailable(
    pg: PgDatabase,
) -> None:
    async def check(store: PostgresVaultStore) -> None:
        async with pg.locked("payment_methods"):
            read = asyncio.ensure_future(store.list_payment_methods(ACCT, False, limit=10))
            await pg.waiting_on_a_lock()
            await pg.terminate(waiting_on_a_lock=True)
            with pytest.raises(StoreUnavailable) as info:
                await read
        assert_unavailable(info.value, "shutdown", "connection_lost")
        assert await store.list_payment_methods(ACCT, False, limit=10) == []

    pg_run(check, pg.dsn)


@pytest.mark.postgres
def test_postgres_every_caller_of_a_batched_insert_gets_its_own_store_unavailable(
    pg: PgDatabase,
) -> None:
    # Payment methods queued together go out as one multi-row INSERT: its connection
    # ended, each caller gets a StoreUnavailable of its own (outcome unknown for all).
    async def check(store: PostgresVaultStore) -> None:
        async with pg.locked("payment_methods"):
            inserts = [
                asyncio.ensure_future(store.insert_payment_method(pm(f"pm_batch_{n}")))
                for n in range(5)
            ]
            await pg.waiting_on_a_lock()
            await pg.terminate(waiting_on_a_lock=True)
            results = await asyncio.gather(*inserts, return_exceptions=True)
        for result in results:
            assert isinstance(result, BaseException)
            assert_unavailable(result, "shutdown", "connection_lost")
        assert len({id(r) for r in results}) == len(results)
        await store.insert_payment_method(pm("pm_after"))
        assert await store.get_payment_method(ACCT, False, "pm_after") is not None

    pg_run(check, pg.dsn)


@pytest.mark.postgres
def test_postgres_idle_connections_terminated_are_replaced_without_an_error(
    pg: PgDatabase,
) -> None:
    async def check(store: PostgresVaultStore) -> None:
        assert await pg.terminate() >= 1
        await asyncio.sleep(0.05)
        assert await store.get_account(ACCT) is not None

    pg_run(check, pg.dsn)


@pytest.mark.postgres
def test_postgres_a_database_refusing_connections_is_store_unavailable_until_it_is_back(
    pg: PgDatabase,
) -> None:
    async def check(store: PostgresVaultStore) -> None:
        await pg.allow_connections(False)
        await pg.terminate()
        await asyncio.sleep(0.05)
        try:
            for call in (
                store.get_account(ACCT),
                store.insert_payment_method(pm("pm_refused")),
                store.list_payment_methods(ACCT, False, limit=10),
            ):
                with pytest.raises(StoreUnavailable) as info:
                    await call
                assert_unavailable(info.value, "cannot_connect")
        finally:
            await pg.allow_connections(True)
        assert await store.get_account(ACCT) is not None
        assert await store.get_payment_method(ACCT, False, "pm_refused") is None

    pg_run(check, pg.dsn)


def test_postgres_a_server_that_is_not_there_is_store_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        store = PostgresVaultStore(f"postgresql://postgres@127.0.0.1:{port}/nothing")
        try:
            for _ in range(2):  # the pool is not kept broken: each call tries again
                with pytest.raises(StoreUnavailable) as info:
                    await store.migrate()
                assert_unavailable(info.value, "cannot_connect")
                assert isinstance(info.value.__cause__, OSError)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.postgres
def test_postgres_no_connection_within_the_acquire_timeout_is_store_unavailable(
    pg: PgDatabase,
) -> None:
    async def main() -> None:
        store = PostgresVaultStore(pg.dsn, min_size=1, max_size=1)
        store.acquire_timeout = 0.2
        try:
            await seed(store)
            pool = await store._get_pool()
            async with pool.acquire():  # the pool's only connection, held
                with pytest.raises(StoreUnavailable) as info:
                    await store.get_account(ACCT)
            assert_unavailable(info.value, "timeout")
            assert await store.get_account(ACCT) is not None
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.postgres
def test_postgres_errors_about_the_statement_are_not_unavailable(pg: PgDatabase) -> None:
    import asyncpg

    async def check(store: PostgresVaultStore) -> None:
        pool = await store._get_pool()
        with pytest.raises(asyncpg.UndefinedTableError):
            await pool.fetch("SELECT * FROM no_such_table")
        with pytest.raises(asyncpg.UndefinedTableError):
            async with pool.acquire() as conn:
                await conn.fetch("SELECT * FROM no_such_table")

    pg_run(check, pg.dsn)


@pytest.mark.postgres
def test_postgres_key_store_terminated_is_store_unavailable_then_works(pg: PgDatabase) -> None:
    async def main() -> None:
        store = PostgresKeyStore(pg.dsn)
        try:
            await store.migrate()
            async with pg.locked("meta"):
                write = asyncio.ensure_future(store.set_meta("seal", "{}"))
                await pg.waiting_on_a_lock()
                await pg.terminate(waiting_on_a_lock=True)
                with pytest.raises(StoreUnavailable) as info:
                    await write
            assert_unavailable(info.value, "shutdown", "connection_lost")
            await store.set_meta("seal", "{}")
            assert await store.get_meta("seal") == "{}"
        finally:
            await store.close()

    asyncio.run(main())


# -- SQLite ---------------------------------------------------------------------------------


def sqlite_run(
    path: Path,
    check: Callable[[SQLiteVaultStore], Awaitable[None]],
) -> None:
    async def main() -> None:
        store = SQLiteVaultStore(path)
        try:
            await seed(store)
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


def _cap_pages(store: SQLiteVaultStore | SQLiteKeyStore, extra: int = 0) -> None:
    """The database may not grow past its current size (plus ``extra`` pages): SQLite
    answers SQLITE_FULL, as it does for a full disk. A setting of the connection only."""
    conn = store._conn
    assert conn is not None
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {int(pages) + extra}")


def _uncap_pages(store: SQLiteVaultStore | SQLiteKeyStore) -> None:
    conn = store._conn
    assert conn is not None
    conn.execute("PRAGMA max_page_count = 4294967294")


def test_sqlite_a_full_database_is_store_full_for_every_writer_then_works(
    tmp_path: Path,
) -> None:
    big = {"n": "x" * 20_000}  # several overflow pages: the database must grow

    async def check(store: SQLiteVaultStore) -> None:
        await store.insert_payment_method(pm("pm_before"))
        _cap_pages(store)
        # A lone write, then a batch of concurrent ones (one transaction).
        with pytest.raises(StoreFull) as info:
            await store.insert_payment_method(pm("pm_full", metadata=big))
        assert_unavailable(info.value, "disk_full")
        cause = info.value.__cause__
        while cause is not None and not isinstance(cause, sqlite3.Error):
            cause = cause.__cause__
        assert isinstance(cause, sqlite3.Error)
        results = await asyncio.gather(
            *(store.insert_payment_method(pm(f"pm_full_{n}", metadata=big)) for n in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreFull) for r in results), results
        assert len({id(r) for r in results}) == len(results)
        # Reads still answer.
        assert await store.get_payment_method(ACCT, False, "pm_before") is not None
        assert await store.get_payment_method(ACCT, False, "pm_full") is None
        assert len(await store.list_payment_methods(ACCT, False, limit=50)) == 1
        # Space again: the same store writes, without a restart.
        _uncap_pages(store)
        await store.insert_payment_method(pm("pm_full", metadata=big))
        assert await store.get_payment_method(ACCT, False, "pm_full") is not None

    sqlite_run(tmp_path / "vault.db", check)


def test_sqlite_an_erasure_that_commits_is_not_reported_failed_when_the_scrub_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a delete the writer checkpoints the WAL into the database to scrub it; on a
    # full disk that checkpoint can fail (the database file must grow) after the delete
    # is committed. Its caller must hear "deleted", and the scrub is tried again. (The
    # checkpoint's failure is simulated: a full disk that lets the delete commit but not
    # the checkpoint cannot be arranged reliably.)
    from cardvault.storage.sqlite.wal import WalCheckpoints

    real = WalCheckpoints.scrub
    failing = True
    scrubs: list[bool] = []

    def scrub(writer: sqlite3.Connection, *, wait: bool) -> bool:
        scrubs.append(failing)
        if failing:
            raise sqlite3.OperationalError("database or disk is full")
        return real(writer, wait=wait)

    async def check(store: SQLiteVaultStore) -> None:
        nonlocal failing
        await store.insert_payment_method(pm("pm_erase"))
        monkeypatch.setattr(WalCheckpoints, "scrub", staticmethod(scrub))
        assert await store.delete_payment_method(ACCT, False, "pm_erase")
        assert await store.get_payment_method(ACCT, False, "pm_erase") is None
        failing = False
        await store.insert_payment_method(pm("pm_next"))  # the scrub runs again after it
        assert scrubs == [True, False]

    sqlite_run(tmp_path / "vault.db", check)


def test_sqlite_a_lock_held_past_the_busy_timeout_is_store_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_writer, "BUSY_TIMEOUT_S", 0.3)
    path = tmp_path / "vault.db"

    async def check(store: SQLiteVaultStore) -> None:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailable) as info:
                await store.insert_payment_method(pm("pm_busy"))
            assert_unavailable(info.value, "busy")
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        await store.insert_payment_method(pm("pm_busy"))

    sqlite_run(path, check)


def test_sqlite_a_file_that_cannot_be_opened_is_store_unavailable_until_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_writer, "REOPEN_AFTER_S", 0.0)
    parent = tmp_path / "state"
    parent.write_text("a file where the store's directory should be")
    path = parent / "vault.db"

    async def main() -> None:
        store = SQLiteVaultStore(path)
        try:
            for call in (store.migrate(), store.get_account(ACCT), store.list_api_keys(ACCT)):
                with pytest.raises(StoreUnavailable) as info:
                    await call
                assert_unavailable(info.value, "cannot_open")
            # Mended: the same store opens its file at the next call.
            parent.unlink()
            await seed(store)
            assert await store.get_account(ACCT) is not None
            assert await store.list_api_keys(ACCT) == []
        finally:
            await store.close()

    asyncio.run(main())


def test_sqlite_key_store_full_is_store_full(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteKeyStore(tmp_path / "keyd.db")
        try:
            await store.migrate()
            await store.set_meta("seal", "{}")
            _cap_pages(store)
            failure: BaseException | None = None
            for version in range(1, 50):
                try:
                    await store.add_kek(StoredKek("pan", version, b"\x03" * 2000, NOW))
                except Exception as exc:
                    failure = exc
                    break
            assert failure is not None, "the database never filled up"
            assert isinstance(failure, StoreFull)
            assert_unavailable(failure, "disk_full")
            _uncap_pages(store)
            await store.add_kek(StoredKek("pan", 99, b"\x03" * 2000, NOW))
        finally:
            await store.close()

    asyncio.run(main())


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_sqlite_a_really_full_disk_is_store_full_then_works_once_space_is_freed(
    tmp_path: Path,
) -> None:
    with tiny_tmpfs(tmp_path / "small", "1m") as small:
        path = small / "vault.db"
        filler = small / "filler"

        async def check(store: SQLiteVaultStore) -> None:
            await store.insert_payment_method(pm("pm_before"))
            # Leave the store little room, then write until the disk is full.
            with contextlib.suppress(OSError), open(filler, "wb") as fh:
                fh.write(b"\0" * (1024 * 1024))
            failure: BaseException | None = None
            for n in range(2000):
                try:
                    await store.insert_payment_method(pm(f"pm_disk_{n}", metadata={"n": "z" * 900}))
                except Exception as exc:
                    failure = exc
                    break
            assert failure is not None, "the disk never filled up"
            assert_unavailable(failure, "disk_full")
            # Every earlier write is still there and readable.
            assert await store.get_payment_method(ACCT, False, "pm_before") is not None
            # Space again: the same store writes, without a restart.
            filler.unlink()
            await store.insert_payment_method(pm("pm_disk_after"))
            assert await store.get_payment_method(ACCT, False, "pm_disk_after") is not None

        sqlite_run(path, check)
