"""Storage: the vault's store interface, its two implementations, and their schema.

``storage`` holds ciphertext and non-secret card facts only; it knows nothing of HTTP
or of plaintext. :func:`open_vault_store` picks the implementation from a URL.
"""

from __future__ import annotations

from pathlib import Path

from cardvault.errors import ConfigurationError
from cardvault.storage.base import (
    Account,
    ApiKey,
    DataKeyRecord,
    DuplicateError,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    VaultStore,
)
from cardvault.storage.postgres import PostgresVaultStore
from cardvault.storage.sqlite import SQLiteVaultStore

__all__ = [
    "Account",
    "ApiKey",
    "DataKeyRecord",
    "DuplicateError",
    "ForwardingRequestRecord",
    "IdempotencyRecord",
    "Mode",
    "PaymentMethodRecord",
    "PostgresVaultStore",
    "SQLiteVaultStore",
    "VaultStore",
    "open_vault_store",
]


def open_vault_store(url: str) -> VaultStore:
    """The store for ``sqlite:///absolute/path.db`` or ``postgresql://user@host/db``.

    Nothing is opened yet: the first call (normally ``migrate()``) connects. Raises
    :class:`~cardvault.errors.ConfigurationError` for any other URL.
    """
    if url.startswith("sqlite:///"):
        # sqlite:///abs/path, or SQLAlchemy's sqlite:////abs/path: always absolute.
        path = url.removeprefix("sqlite://").lstrip("/")
        if not path:
            raise ConfigurationError("setting store.url must name a database file")
        return SQLiteVaultStore(Path("/" + path))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresVaultStore(url)
    # The URL is not repeated: a PostgreSQL URL may carry a password.
    raise ConfigurationError("setting store.url must start with sqlite:/// or postgresql://")
