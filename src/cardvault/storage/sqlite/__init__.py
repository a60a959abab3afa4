"""The stores on SQLite: one file each, written through one group-commit writer.

``connection``: opening a file (mode 0600, WAL, ``synchronous=FULL``, secure delete)
and the migrations runner. ``writer``: :class:`SQLiteDatabase`, the group-commit writer
and the read pool, which knows no table. ``wal``: checkpoints and scrubbing. ``vault``
and ``keys``: each store's queries, subclasses of :class:`SQLiteDatabase`.
"""

from __future__ import annotations

from cardvault.storage.sqlite.keys import SQLiteKeyStore
from cardvault.storage.sqlite.vault import SQLiteVaultStore
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteDatabase", "SQLiteKeyStore", "SQLiteVaultStore"]
