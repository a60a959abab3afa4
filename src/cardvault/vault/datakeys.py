"""Data keys in the vault: few key-service round trips, bounded exposure.

* **Encryption**: one current data key per KEK (``pan``, ``cvc``). It serves at most
  ``max_uses`` encryptions and ``max_age`` seconds, then the next one is fetched. Only
  one fetch runs at a time; concurrent requests wait for it. The wrapped key is stored
  (durably) before its first use, so no ciphertext can exist whose key is not stored.
* **Decryption**: unwrapped keys are cached for ``cache_ttl`` seconds, at most
  ``cache_size`` of them (least recently used goes first). A key that leaves the cache
  is zeroed as soon as no request still uses it (``Key`` wipes itself when dropped).
* **Fingerprints**: the per-account key (HKDF of the ``fingerprint`` KEK in the key
  service) is cached the same way.
* **One fetch per key**: requests that miss the same key at the same moment (a cold
  start, or a cached key just expired, under concurrent load) share one key-service
  call instead of sending one each.

With the defaults (50,000 uses per key) the key service sees one ``datakey`` call per
50,000 tokenizations for card numbers and one more per 50,000 CVCs: 0.4 round trips per
10,000 tokenizations, inside the target of one. A key is also retired after an hour,
so at low volume the count is set by time instead (one pair of calls per hour).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cardvault import crypto
from cardvault.errors import APIError
from cardvault.storage.base import DataKeyRecord, EventRecord, VaultStore
from cardvault.vault.ids import new_id
from cardvault.vault.keyclient import DataKey, KeyServiceClient

__all__ = ["DataKeyManager", "DataKeyPolicy"]


@dataclass(frozen=True)
class DataKeyPolicy:
    """How long a data key serves (uses and seconds) and how unwrapped keys are cached."""

    max_uses: int = 50_000
    max_age: float = 3600.0
    cache_ttl: float = 300.0
    cache_size: int = 1024
    #: The fingerprint KEK version per-account keys are derived under (pinned, so that
    #: a rotation of that KEK leaves fingerprints comparable); None: the newest.
    fingerprint_version: int | None = None


class _Current:
    __slots__ = ("born", "key", "made", "record_id", "uses")

    def __init__(self, record_id: str, key: crypto.Key, born: float, made: int) -> None:
        self.record_id = record_id
        self.key = key
        self.born = born  # the manager's clock, for max_age
        self.made = made  # the stored record's ``created`` (Unix seconds)
        self.uses = 0


class _TtlCache:
    """An LRU of keys with a lifetime. A key that expires or is evicted is not wiped
    here (a request may still be using it): it zeroes itself when the last reference
    goes. :meth:`clear` wipes at once."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self._items: OrderedDict[str, tuple[crypto.Key, float]] = OrderedDict()
        self._size, self._ttl, self._clock = size, ttl, clock

    def get(self, name: str) -> crypto.Key | None:
        item = self._items.get(name)
        if item is None:
            return None
        key, expires = item
        if expires <= self._clock():
            # Not wiped here: a request may still be using it. Key zeroes its buffer
            # when the last reference goes.
            del self._items[name]
            return None
        self._items.move_to_end(name)
        return key

    def put(self, name: str, key: crypto.Key) -> None:
        self._items[name] = (key, self._clock() + self._ttl)
        self._items.move_to_end(name)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        for key, _ in self._items.values():
            key.wipe()
        self._items.clear()


class DataKeyManager:
    """The vault's data keys: for sealing (one current key per KEK), for opening (a
    cache of unwrapped keys) and the per-account fingerprint keys, as the module
    docstring describes. The only part of the vault that asks the key service for keys
    (through :class:`~cardvault.vault.keyclient.KeyServiceClient`); it stores each
    wrapped key in the vault's store before the key's first use."""

    def __init__(
        self,
        store: VaultStore,
        keys: KeyServiceClient,
        policy: DataKeyPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.keys = keys
        self.policy = policy or DataKeyPolicy()
        self._clock = clock
        self._current: dict[str, _Current] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache = _TtlCache(self.policy.cache_size, self.policy.cache_ttl, clock)
        self._account_keys = _TtlCache(self.policy.cache_size, self.policy.cache_ttl, clock)
        self._flights: dict[str, asyncio.Future[crypto.Key]] = {}
        self._generation = 0

    def _fresh(self, current: _Current | None) -> bool:
        return (
            current is not None
            and current.uses < self.policy.max_uses
            and self._clock() - current.born < self.policy.max_age
        )

    async def for_encryption(self, kek: str) -> tuple[str, crypto.Key]:
        """``(data_key_id, key)`` to seal one more value under. Counts one use."""
        current = self._current.get(kek)
        if not self._fresh(current):
            lock = self._locks.setdefault(kek, asyncio.Lock())
            async with lock:
                current = self._current.get(kek)
                if not self._fresh(current):
                    current = await self._new_key(kek)
        assert current is not None
        current.uses += 1
        return current.record_id, current.key

    async def _new_key(
        self, kek: str, fetched: DataKey | None = None, events: Sequence[EventRecord] = ()
    ) -> _Current:
        if fetched is None:
            fetched = await self.keys.datakey(kek)
        # Letters and digits (62 symbols), not hex: a hex id holds a run of 13 or more
        # digits often enough (about 1 in 400) for log scrubbers and at-rest scanners
        # to take it for a card number.
        record_id = new_id("dk_", 24)
        made = int(time.time())
        record = DataKeyRecord(record_id, kek, fetched.kek_version, fetched.wrapped, made)
        if events:
            await self.store.insert_events(events, data_key=record)
        else:
            await self.store.insert_data_key(record)
        key = crypto.Key(record_id, 1, fetched.plaintext)
        current = _Current(record_id, key, self._clock(), made)
        self._current[kek] = current
        self._cache.put(record_id, key)
        return current

    async def renew_if_made_before(self, kek: str, before: int) -> None:
        """Start a new current data key for ``kek`` if this one was made before
        ``before`` (Unix seconds): re-sealed card data must not land under a key that
        its re-encryption run is moving away from."""
        lock = self._locks.setdefault(kek, asyncio.Lock())
        async with lock:
            current = self._current.get(kek)
            if current is not None and current.made < before:
                await self._new_key(kek)

    async def renew(self, kek: str, fetched: DataKey, events: Sequence[EventRecord]) -> str:
        """Make ``fetched`` (just had from the key service) the current data key for
        ``kek`` now, stored with ``events`` in one transaction (a KEK rotated: the first
        data key under its new version and the ``key.rotated`` events); its id."""
        lock = self._locks.setdefault(kek, asyncio.Lock())
        async with lock:
            return (await self._new_key(kek, fetched, events)).record_id

    async def for_decryption(self, data_key_id: str, kek: str) -> crypto.Key:
        """The key named ``data_key_id``, from the cache or unwrapped by the key service."""
        key = self._cache.get(data_key_id)
        if key is not None:
            return key

        async def fetch() -> crypto.Key:
            record = await self.store.get_data_key(data_key_id)
            if record is None or record.kek != kek:
                # A payment method that names a data key we do not have is corrupt storage.
                raise APIError()
            return crypto.Key(data_key_id, 1, await self.keys.unwrap(kek, record.wrapped))

        return await self._once(f"unwrap:{kek}:{data_key_id}", fetch, self._cache, data_key_id)

    async def account_key(self, account_id: str) -> crypto.Key:
        """The per-account fingerprint key."""
        key = self._account_keys.get(account_id)
        if key is not None:
            return key

        async def fetch() -> crypto.Key:
            pinned = self.policy.fingerprint_version
            if pinned is None:
                material, version = await self.keys.derive("fingerprint", account_id)
            else:
                material, version = await self.keys.derive("fingerprint", account_id, pinned)
            return crypto.Key(f"fingerprint:{account_id}", version, material)

        return await self._once(f"derive:{account_id}", fetch, self._account_keys, account_id)

    async def _once(
        self,
        name: str,
        fetch: Callable[[], Awaitable[crypto.Key]],
        cache: _TtlCache,
        cache_name: str,
    ) -> crypto.Key:
        """``fetch()``, shared by every caller that asks for ``name`` while it runs, and
        its key cached as ``cache_name``. A caller that is cancelled does not cancel the
        others' fetch; a failure reaches every caller, and the next request tries again.

        The fetch runs in a context of its own (it serves many requests, so its log
        lines carry none's request id). A key fetched after :meth:`wipe` is not cached:
        nothing put in a cache after it was wiped could be wiped again."""
        flight = self._flights.get(name)
        if flight is None:
            generation = self._generation

            async def run() -> crypto.Key:
                key = await fetch()
                if generation == self._generation:
                    cache.put(cache_name, key)
                return key

            loop = asyncio.get_running_loop()
            flight = loop.create_task(run(), context=contextvars.Context())
            self._flights[name] = flight
            flight.add_done_callback(lambda done: self._landed(name, done))
        return await asyncio.shield(flight)

    def _landed(self, name: str, flight: asyncio.Future[crypto.Key]) -> None:
        if self._flights.get(name) is flight:
            del self._flights[name]
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter may have been cancelled

    def wipe(self) -> None:
        self._generation += 1
        for flight in self._flights.values():
            flight.cancel()
        self._flights.clear()
        self._cache.clear()
        self._account_keys.clear()
        self._current.clear()
