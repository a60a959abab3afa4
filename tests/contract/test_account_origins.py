"""VaultStore contract for the origins allowed to frame an account's card element.

Runs on SQLite (a file in ``tmp_path``) and on PostgreSQL (a database created for the
test on the server at 127.0.0.1:5432 and dropped after it; CI starts the server). Its
fixtures are its own, as in ``test_vault_store.py``, so each contract suite stands alone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from cardvault.storage import Account, PostgresVaultStore, SQLiteVaultStore, VaultStore

POSTGRES_ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NOW = 1_760_000_000
SHOP = "https://shop.example"
LOCAL = "https://127.0.0.1:8443"

Opener = Callable[[], VaultStore]


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    name = f"vault_origins_{secrets.token_hex(6)}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    if request.param == "sqlite":
        path = tmp_path / "vault.db"
        return lambda: SQLiteVaultStore(path)
    dsn = request.getfixturevalue("postgres_dsn")
    return lambda: PostgresVaultStore(dsn)


def run(opener: Opener, check: Callable[[VaultStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = opener()
        try:
            await store.migrate()
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


async def origins(store: VaultStore, account_id: str) -> tuple[str, ...]:
    account = await store.get_account(account_id)
    assert account is not None
    return account.allowed_origins


def test_set_allowed_origins_replaces_the_list_in_order(opener: Opener) -> None:
    async def check(store: VaultStore) -> None:
        await store.create_account(Account("acct_1", "Shop", NOW))
        assert await origins(store, "acct_1") == ()
        assert await store.set_allowed_origins("acct_1", [SHOP, LOCAL]) is True
        assert await origins(store, "acct_1") == (SHOP, LOCAL)
        assert await store.set_allowed_origins("acct_1", [LOCAL]) is True
        assert await origins(store, "acct_1") == (LOCAL,)

    run(opener, check)


def test_set_allowed_origins_to_empty_clears_the_list(opener: Opener) -> None:
    async def check(store: VaultStore) -> None:
        await store.create_account(Account("acct_1", "Shop", NOW, (SHOP,)))
        assert await store.set_allowed_origins("acct_1", []) is True
        assert await origins(store, "acct_1") == ()

    run(opener, check)


def test_set_allowed_origins_touches_only_that_account(opener: Opener) -> None:
    async def check(store: VaultStore) -> None:
        await store.create_account(Account("acct_1", "Shop", NOW, (SHOP,)))
        await store.create_account(Account("acct_2", "Other", NOW, (SHOP,)))
        await store.set_allowed_origins("acct_1", [LOCAL])
        other = await store.get_account("acct_2")
        assert other is not None and other.allowed_origins == (SHOP,)
        assert other.name == "Other" and other.created == NOW

    run(opener, check)


def test_set_allowed_origins_for_an_unknown_account_returns_false(opener: Opener) -> None:
    async def check(store: VaultStore) -> None:
        assert await store.set_allowed_origins("acct_missing", [SHOP]) is False
        assert await store.get_account("acct_missing") is None

    run(opener, check)


def test_allowed_origins_survive_reopening_the_store(opener: Opener) -> None:
    async def write(store: VaultStore) -> None:
        await store.create_account(Account("acct_1", "Shop", NOW))
        await store.set_allowed_origins("acct_1", [SHOP])

    async def read(store: VaultStore) -> None:
        account = await store.get_account("acct_1")
        assert account is not None and account.allowed_origins == (SHOP,)

    run(opener, write)
    run(opener, read)
