"""The vault's administration, on the vault's host: accounts, API keys, allowed origins.

The one door for the command line (``cardvault accounts``, ``cardvault api-keys``) and
for the local stack's set-up (``cardvault up``): :func:`administer` opens the vault's
store and its administration audit log (the running vault holds its own log, so the
operator's actions go to ``<audit directory>-admin``), runs the work on an
:class:`Administration`, and closes both. Nothing here needs card keys or the key
service. The command line imports this module and never the storage layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from cardvault.audit import AuditLog
from cardvault.audit.recorder import Recorder
from cardvault.errors import ConfigurationError, ResourceMissing
from cardvault.storage import open_vault_store
from cardvault.storage.base import ApiKey
from cardvault.vault.accounts import Accounts
from cardvault.vault.element import normalize_origin
from cardvault.vault.settings import VaultSettings

__all__ = ["Administration", "NewAccount", "administer", "normalize_origin"]

T = TypeVar("T")
Kind = Literal["publishable", "secret"]
Mode = Literal["test", "live"]


@dataclass
class NewAccount:
    """An account just made: its id, its allowed origins, and its keys as
    ``(kind, mode, key)``, shown once."""

    id: str
    origins: list[str]
    keys: list[tuple[Kind, Mode, str]] = field(default_factory=list)


class Administration:
    """What an operator may do to the vault's accounts (every action is audited)."""

    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def create_account(
        self, name: str, *, origins: list[str] | None = None, live: bool = False
    ) -> NewAccount:
        """A new account with a publishable and a secret key in test mode (and in live
        mode with ``live``), its card element framed by ``origins`` only."""
        account = await self._accounts.create_account(name)
        made = NewAccount(account.id, list(origins or []))
        if made.origins:
            await self._accounts.set_allowed_origins(account.id, made.origins)
        modes: list[Mode] = ["test", "live"] if live else ["test"]
        for mode in modes:
            for kind in ("publishable", "secret"):
                _record, key = await self._accounts.create_api_key(account.id, kind, mode)
                made.keys.append((kind, mode, key))
        return made

    async def set_allowed_origins(self, account_id: str, origins: list[str]) -> bool:
        """Replace the account's allowed origins; False when there is no such account."""
        return await self._accounts.set_allowed_origins(account_id, origins)

    async def allow_origin(self, account_id: str, origin: str) -> None:
        """Add ``origin`` to the account's allowed origins, keeping the others."""
        account = await self._accounts.get_account(account_id)
        if account is None:
            raise ResourceMissing("No such account.")
        if origin not in account.allowed_origins:
            await self._accounts.set_allowed_origins(account_id, [*account.allowed_origins, origin])

    async def create_api_key(self, account_id: str, kind: Kind, mode: Mode) -> tuple[ApiKey, str]:
        """One new key: its record and the key itself, shown once and stored hashed."""
        return await self._accounts.create_api_key(account_id, kind, mode)

    async def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key by its id; False when there is no such key, or it is revoked."""
        return await self._accounts.revoke_api_key(key_id)


def administer(settings: VaultSettings, work: Callable[[Administration], Awaitable[T]]) -> T:
    """Run ``work`` on the vault's administration, with the vault's store (migrated to
    the current schema) and its administration audit log, and close both after."""
    if not settings.store.url:
        raise ConfigurationError("missing required setting store.url")

    async def go() -> T:
        _directory, admin_directory = settings.audit.resolved(settings.store.url)
        store = open_vault_store(settings.store.url)
        recorder = Recorder(await AuditLog.open(admin_directory))
        try:
            await store.migrate()
            return await work(Administration(Accounts(store, audit=recorder)))
        finally:
            await recorder.close()
            await store.close()

    return asyncio.run(go())
