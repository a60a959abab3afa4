"""The stores on PostgreSQL, through asyncpg: each in a database of its own.

``pool``: :class:`PostgresDatabase`, the pool, the migrations runner and the mapping of
asyncpg's errors, which knows no table. ``vault`` and ``keys``: each store's queries,
subclasses of :class:`PostgresDatabase`.
"""

from __future__ import annotations

from cardvault.storage.postgres.keys import PostgresKeyStore
from cardvault.storage.postgres.pool import PostgresDatabase
from cardvault.storage.postgres.vault import PostgresVaultStore

__all__ = ["PostgresDatabase", "PostgresKeyStore", "PostgresVaultStore"]
