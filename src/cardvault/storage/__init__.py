"""Storage: every database of cardvault, behind one layer.

Two stores, each with its interface and records in :mod:`~cardvault.storage.base`, each
on SQLite (one file, the embedded default) and on PostgreSQL, each in a database of its
own (the vault's and the key service's are never the same database):

* the **vault store** (:class:`VaultStore`, :func:`open_vault_store`): accounts, API
  keys, wrapped data keys, payment methods (ciphertext and the card facts that are not
  secret), forwarding requests, idempotency keys;
* the **key store** (:class:`KeyStore`, :func:`open_key_store`): the key service's KEKs
  sealed under its root key, key settings, seal metadata, events.

Layout: ``base`` (interfaces, records, errors), ``migrations`` (every store's schema as
versioned migrations, and the rules of the one runner), ``rows`` (columns and the
conversions between rows and records, and the key store's statements), ``pages`` (list
pages), ``sqlite/`` (the group-commit writer, checkpoints, and each store's queries),
``postgres/`` (the pool, and each store's queries). One contract suite per interface
(``tests/contract/``) runs on both backends.

What this package may import: the standard library, ``sqlite3``, ``asyncpg``,
``structlog``, and of cardvault only :mod:`cardvault.errors` and
:mod:`cardvault.files` (private files). Nothing of HTTP (no
starlette, uvicorn, httpx, aiohttp), nothing of :mod:`cardvault.vault`,
:mod:`cardvault.keyservice`, :mod:`cardvault.transport` or :mod:`cardvault.cards`. It
never sees plaintext card data or keys: what it stores is ciphertext, sealed keys and
facts that are not secret. The services import it, never the other way round.

A database that cannot be reached or cannot take a write now (a lost PostgreSQL
connection, a full disk, an I/O error, a lock held too long) is raised by every store as
one exception, :class:`StoreUnavailable` (:class:`StoreFull` for a full disk), never as
the driver's: an API error already (503 ``database_unavailable`` or ``storage_full``,
with ``Retry-After``). It does not mean "not written": see its docstring.
"""

from __future__ import annotations

from pathlib import Path

from cardvault.storage._shared import StoreFull, StoreUnavailable, store_location
from cardvault.storage.base import (
    Account,
    ApiKey,
    DataKeyRecord,
    DuplicateError,
    ForwardingRequestRecord,
    IdempotencyRecord,
    KekExists,
    KeyStore,
    Mode,
    PaymentMethodRecord,
    StoredKek,
    UnstorableValue,
    VaultStore,
)
from cardvault.storage.migrations import STORED_IDEMPOTENCY_KEY_PREFIX
from cardvault.storage.postgres import PostgresKeyStore, PostgresVaultStore
from cardvault.storage.sqlite import SQLiteKeyStore, SQLiteVaultStore

__all__ = [
    "STORED_IDEMPOTENCY_KEY_PREFIX",
    "Account",
    "ApiKey",
    "DataKeyRecord",
    "DuplicateError",
    "ForwardingRequestRecord",
    "IdempotencyRecord",
    "KekExists",
    "KeyStore",
    "Mode",
    "PaymentMethodRecord",
    "PostgresKeyStore",
    "PostgresVaultStore",
    "SQLiteKeyStore",
    "SQLiteVaultStore",
    "StoreFull",
    "StoreUnavailable",
    "StoredKek",
    "UnstorableValue",
    "VaultStore",
    "open_key_store",
    "open_vault_store",
]


def open_vault_store(url: str) -> VaultStore:
    """The vault's store for ``sqlite:///absolute/path.db`` or
    ``postgresql://user@host/db``.

    Nothing is opened yet: the first call (normally ``migrate()``) connects. Raises
    :class:`~cardvault.errors.ConfigurationError` for any other URL.
    """
    location = store_location(url)
    if isinstance(location, Path):
        return SQLiteVaultStore(location)
    return PostgresVaultStore(location)


def open_key_store(url: str) -> KeyStore:
    """The key service's store for ``sqlite:///absolute/path/keyd.db`` or
    ``postgresql://role@host/db``: a database of its own, never the vault's. Opened as
    :func:`open_vault_store` opens the vault's."""
    location = store_location(url)
    return SQLiteKeyStore(location) if isinstance(location, Path) else PostgresKeyStore(location)
