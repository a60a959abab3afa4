"""Idempotency-Key: a create retried with the same key is done once (Stripe's semantics).

Same key and same parameters: the first result (the object read again now, or the
error that may have sent a request out); other parameters: 400; the first request
still running: 409. A request that failed with nothing done stores nothing, so its key
can be used again. Keys are remembered ``ttl`` seconds (24 hours by default).

Nothing the caller sent is stored as sent. The key is stored as ``ik_`` and a MAC of the
header under the account's own key (:func:`stored_idempotency_key`): the header is the
caller's text and may hold a card number. The parameters are stored as a MAC under the
same key: a plain hash of parameters holding a card number could be brute-forced back
to the number. The stored result is the new object's id, never its content, so no
cardholder data rests in this table.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from cardvault import crypto
from cardvault.errors import (
    CardVaultError,
    IdempotencyError,
    IdempotencyKeyInUse,
    InvalidRequestError,
    error_class_for,
)
from cardvault.storage import STORED_IDEMPOTENCY_KEY_PREFIX
from cardvault.storage.base import IdempotencyRecord, VaultStore
from cardvault.vault.accounts import Caller
from cardvault.vault.datakeys import DataKeyManager

__all__ = ["Idempotency", "Outcome", "stored_idempotency_key"]

_MAX_IDEMPOTENCY_KEY = 255
#: Domain separation: the same account key makes card fingerprints (digits only) and
#: parameter MACs (a JSON array), so this prefix can be neither.
_IDEMPOTENCY_KEY_CONTEXT = b"cardvault idempotency-key v1\x00"
#: A stored result that is an error's code, not an object's id, starts with this.
_ERROR_MARK = "!"


def stored_idempotency_key(account_key: crypto.Key, header: str) -> str:
    """The Idempotency-Key as it is stored: ``ik_`` and a MAC of the header under the
    account's key. The header is the caller's text, and an outside tester stored a card
    number in the clear through it; keyed, because an unkeyed hash of a card number is
    undone by trying every number."""
    return STORED_IDEMPOTENCY_KEY_PREFIX + crypto.fingerprint(
        account_key, _IDEMPOTENCY_KEY_CONTEXT + header.encode("utf-8")
    )


class Outcome(NamedTuple):
    """A create's answer, and whether it is the first request's, replayed."""

    body: dict[str, Any]
    replayed: bool


class Idempotency:
    """The vault's Idempotency-Key records, in its store, keyed by each account's key.

    Needs the store and the data keys (for the account's key), nothing else. The HTTP
    layer calls :meth:`run` once per create."""

    def __init__(self, store: VaultStore, keys: DataKeyManager, *, ttl: int = 86_400) -> None:
        self.store = store
        self.keys = keys
        self.ttl = ttl

    async def run(
        self,
        caller: Caller,
        header: str | None,
        path: str,
        params: dict[str, Any],
        create: Callable[[], Awaitable[dict[str, Any]]],
        replay: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> Outcome:
        """``create()`` at most once per ``header`` (the request's Idempotency-Key, or
        None) for ``path`` and ``params``; ``replay(object_id)`` reads the first result
        again.

        An error whose ``consumes_idempotency_key`` is true (a forward that reached the
        network) is remembered too, so a retry with the same key repeats the error
        instead of sending a second outbound request."""
        if header is None:
            return Outcome(await create(), replayed=False)
        if not header or len(header) > _MAX_IDEMPOTENCY_KEY:
            raise InvalidRequestError("Idempotency-Key must be 1 to 255 characters.")
        account_key = await self.keys.account_key(caller.account_id)
        canonical = json.dumps([path, params], sort_keys=True, separators=(",", ":"))
        mac = crypto.fingerprint(account_key, canonical.encode())
        key = stored_idempotency_key(account_key, header)
        claim = IdempotencyRecord(caller.account_id, caller.mode, key, mac, int(time.time()))
        existing = await self._claim(claim)
        if existing is not None:
            return await self._replay(existing, mac, replay)
        try:
            body = await create()
        except CardVaultError as exc:
            if getattr(exc, "consumes_idempotency_key", False):
                await self.store.complete_idempotency_key(
                    caller.account_id, caller.mode, key, exc.http_status, _ERROR_MARK + exc.code
                )
                raise
            # Nothing was done; the key may be used again, as Stripe does for requests
            # that failed validation.
            await self.store.release_idempotency_key(caller.account_id, caller.mode, key)
            raise
        except BaseException:
            await self.store.release_idempotency_key(caller.account_id, caller.mode, key)
            raise
        await self.store.complete_idempotency_key(
            caller.account_id, caller.mode, key, 200, body["id"]
        )
        return Outcome(body, replayed=False)

    async def _claim(self, claim: IdempotencyRecord) -> IdempotencyRecord | None:
        """Claim the key; the record that already holds it, if any. A record older than
        ``ttl`` is released first and the key claimed afresh."""
        existing = await self.store.claim_idempotency_key(claim)
        if existing is not None and existing.created < claim.created - self.ttl:
            await self.store.release_idempotency_key(claim.account_id, claim.mode, claim.key)
            existing = await self.store.claim_idempotency_key(claim)
        return existing

    @staticmethod
    async def _replay(
        existing: IdempotencyRecord,
        mac: str,
        replay: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> Outcome:
        if not hmac.compare_digest(existing.request_hash, mac):
            raise IdempotencyError()
        if existing.response_status is None or existing.response_body is None:
            raise IdempotencyKeyInUse()
        if existing.response_body.startswith(_ERROR_MARK):
            replayed = error_class_for(existing.response_body[1:])()
            replayed.headers["Idempotent-Replayed"] = "true"
            raise replayed
        return Outcome(await replay(existing.response_body), replayed=True)
