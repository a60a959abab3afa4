"""Accounts, their API keys, and who is calling: the vault's tenants.

An account is a merchant (a tenant). It has API keys of two kinds, publishable
(``pk_…``, for web pages: may only create payment methods) and secret (``sk_…``), in
two modes that never mix (test and live). A key is shown once, when it is made; the
vault stores only its SHA-256. :meth:`Accounts.authenticate` turns a presented key into
a :class:`Caller`, which is all the rest of the vault knows of who is asking.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass
from typing import Literal

from cardvault.audit.recorder import Recorder
from cardvault.audit.text import untrusted_text
from cardvault.errors import AuthenticationError, PermissionDenied, ResourceMissing
from cardvault.storage.base import Account, ApiKey, VaultStore
from cardvault.vault.ids import looks_like_id, new_id

__all__ = ["Accounts", "Caller", "hash_api_key", "require_secret"]

_KEY_ALPHABET = string.ascii_letters + string.digits
#: Seconds a key look-up is cached: a revoked key stops working within that time.
_KEY_CACHE_SECONDS = 2.0
_KEY_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Caller:
    """Who is calling: the account, the mode, and what kind of key they used."""

    account_id: str
    mode: Literal["test", "live"]
    kind: Literal["publishable", "secret"]
    key_id: str

    @property
    def livemode(self) -> bool:
        return self.mode == "live"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def require_secret(caller: Caller) -> None:
    """403 ``permission_denied`` unless the caller used a secret key."""
    if caller.kind != "secret":
        raise PermissionDenied(
            "Publishable keys can only create payment methods. Use a secret key for this request."
        )


class Accounts:
    """Accounts and API keys in the vault's store: made and revoked by the operator
    (``cardvault accounts``, ``cardvault api-keys``), and checked on every request.

    Needs the store and the audit recorder, nothing else: no card data and no key
    service, so the command line can use it on its own."""

    def __init__(self, store: VaultStore, *, audit: Recorder | None = None) -> None:
        self.store = store
        self.audit = audit or Recorder(None)
        self._key_cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def create_account(self, name: str) -> Account:
        account = Account(new_id("acct_", 16), name, int(time.time()))
        await self.store.create_account(account)
        await self.audit.record("account.created", actor="cli", object_id=account.id)
        return account

    async def get_account(self, account_id: str) -> Account | None:
        return await self.store.get_account(account_id)

    async def create_api_key(
        self, account_id: str, kind: Literal["publishable", "secret"], mode: Literal["test", "live"]
    ) -> tuple[ApiKey, str]:
        """A new key: the record and the key itself, which is shown once and never stored."""
        if await self.store.get_account(account_id) is None:
            raise ResourceMissing("No such account.")
        prefix = {"publishable": "pk", "secret": "sk"}[kind]
        secret = f"{prefix}_{mode}_" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(40))
        record = ApiKey(
            id=new_id("key_", 16),
            account_id=account_id,
            kind=kind,
            mode=mode,
            prefix=secret[:12],
            hash=hash_api_key(secret),
            created=int(time.time()),
        )
        await self.store.create_api_key(record)
        await self.audit.record(
            "api_key.created",
            actor="cli",
            object_id=record.id,
            detail={"account": account_id, "kind": kind, "mode": mode},
        )
        return record, secret

    async def set_allowed_origins(self, account_id: str, origins: list[str]) -> bool:
        """Replace the origins whose pages may frame the account's card element; False
        when there is no such account. Recorded, with how many origins (the origins
        are configuration, not secrets, but the record's detail stays small)."""
        done = await self.store.set_allowed_origins(account_id, origins)
        await self.audit.record(
            "account.origins_set",
            actor="cli",
            object_id=account_id
            if looks_like_id(account_id, "acct_")
            else untrusted_text(account_id),
            result="ok" if done else "not_found",
            detail={"origins": len(origins)},
        )
        return done

    async def revoke_api_key(self, key_id: str) -> bool:
        done = await self.store.revoke_api_key(key_id, int(time.time()))
        self._key_cache.clear()
        # The id is the operator's text: an operator who pastes the key itself (or
        # anything else) must get an audit record, not a refusal to write one.
        await self.audit.record(
            "api_key.revoked",
            actor="cli",
            object_id=key_id if looks_like_id(key_id, "key_") else untrusted_text(key_id),
            result="ok" if done else "not_found",
        )
        return done

    async def authenticate(self, presented: str | None) -> Caller:
        """The caller behind an API key. 401 for a missing, malformed, unknown or revoked key.

        Lookups are cached for two seconds: a revoked key stops working within that time.
        """
        if not presented:
            await self._auth_failed("missing")
            raise AuthenticationError(
                "You did not provide an API key. Provide it as a Bearer token in the Authorization header."
            )
        if (
            not presented.startswith(("sk_test_", "sk_live_", "pk_test_", "pk_live_"))
            or len(presented) > 200
        ):
            await self._auth_failed("malformed")
            raise AuthenticationError()
        digest = hash_api_key(presented)
        now = time.monotonic()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[1] > now:
            record = cached[0]
        else:
            record = await self.store.find_api_key(digest)
            if len(self._key_cache) > _KEY_CACHE_MAX:
                self._key_cache.clear()
            self._key_cache[digest] = (record, now + _KEY_CACHE_SECONDS)
        if (
            record is None
            or record.revoked is not None
            or not hmac.compare_digest(record.hash, digest)
        ):
            # The presented key is a secret even when wrong: only its kind is recorded,
            # and the key id when it is a known (revoked) key.
            await self._auth_failed(
                "revoked" if record is not None else "unknown",
                presented[:7].rstrip("_"),
                record.id if record is not None else None,
            )
            raise AuthenticationError()
        return Caller(record.account_id, record.mode, record.kind, record.id)

    async def _auth_failed(
        self, reason: str, kind: str | None = None, key_id: str | None = None
    ) -> None:
        detail: dict[str, str | None] = {"reason": reason, "key_kind": kind}
        await self.audit.record(
            "auth.failed", actor=key_id or "anonymous", result="refused", detail=detail
        )
