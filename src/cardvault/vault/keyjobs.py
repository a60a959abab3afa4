"""Key maintenance inside the vault: how many stored data keys each KEK version still
wraps, and the re-encryption job that moves them to the newest version.

The job runs in the vault, one batch per call of the admin API
(``POST /v1/admin/keys/{kek}/reencrypt``), so that:

* the card database is opened only by the vault (the command line drives the batches
  over mutual TLS, paces them and shows the progress);
* each batch is self-contained: it reads up to ``batch_size`` data keys under a version
  below the target, in id order after the run's cursor, has the key service re-wrap
  them (``rewrap``, 50 per call: the answer holds no plaintext), stores them in one
  transaction where every key's wrapped form and version change in one row write (and
  only if the row is still under the version it was read under), then commits the
  cursor. A crash or a Ctrl-C anywhere loses at most that batch's work, which the next
  call redoes: re-wrapping is idempotent;
* the data keys themselves do not change, so no card ciphertext is touched and a reader
  sees a key either under its old version or under its new one, both of which unwrap.

A run ends when a pass of the walk finds nothing left below the target; keys stored
behind the cursor while the run went (a data key fetched just before the rotation) are
picked up by a further pass. One audit record per batch (``keys.reencrypt.batch``) and
one for the run (``keys.reencrypt.completed``).

**Card data** (``cardvault keys reencrypt pan --data --before DATE``): the same walk over
payment methods instead of data keys, for when a data key itself must go (a suspected
leak of an unwrapped key, or a cryptoperiod for data keys). Every card whose number and
name (``pan``) or held CVC (``cvc``) is sealed under a data key made before ``before`` is
opened and sealed again under the vault's current data key, which is first renewed if it
too was made before ``before``. Each card's data key and ciphertexts change in one row
write, only if the row is still under the key it was read under, so a reader sees the
card whole under the old key or whole under the new one; the old data key stays stored
(a reader that fetched the row before the write still opens it). The run's row in
``key_jobs`` is ``pan:data`` (or ``cvc:data``), its cursor a payment method id. Audit:
``keys.reencrypt_data.batch`` and ``keys.reencrypt_data.completed``.

**A rotation** (``cardvault keys rotate pan|cvc``, after the key service rotated the KEK:
``POST /v1/admin/keys/{kek}/rotated``): the vault takes a new data key at once (under
the KEK's new version, where it would otherwise keep its current one for up to
``datakeys.max_age``), stored with the ``key.rotated`` events in one transaction
(:mod:`cardvault.vault.systemevents`); audit: ``keys.rotated``. Only the process that
answers takes the new key; another worker takes one at its next renewal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.errors import InvalidRequestError, KeyVersionUnavailable, ResourceMissing
from cardvault.logging import get_logger
from cardvault.storage.base import (
    CardReseal,
    DataKeyMove,
    DataKeyRecord,
    DuplicateError,
    KeyJob,
    PaymentMethodRecord,
    VaultStore,
)
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.ids import new_id
from cardvault.vault.keyclient import KeyServiceClient
from cardvault.vault.payment_methods import card_context
from cardvault.vault.systemevents import SystemEvents

__all__ = ["DATA_KEY_KEKS", "MAX_BATCH", "KeyMaintenance"]

_log = get_logger(__name__)


class _Walked(Protocol):
    """What a re-encryption walk goes through in id order: data keys or cards."""

    @property
    def id(self) -> str: ...


#: The KEKs whose data keys the vault stores.
DATA_KEY_KEKS = ("pan", "cvc")
MAX_BATCH = 1000
#: Re-wrap calls in flight at once within a batch, and keys per call (keyd's limit).
_CONCURRENCY = 4
_PER_CALL = 50


def _job_dict(job: KeyJob | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {
        "run": job.run_id,
        "target_version": job.target_version,
        "cursor": job.cursor,
        "moved": job.moved,
        "started": job.started,
        "updated": job.updated,
        "finished": job.finished,
        "unreadable": job.skipped,
        **({} if job.data_before is None else {"data_before": job.data_before}),
    }


class KeyMaintenance:
    """The vault's side of the key lifecycle (module docstring)."""

    def __init__(
        self,
        store: VaultStore,
        keys: KeyServiceClient,
        audit: Recorder,
        *,
        fingerprint_version: int | None = None,
        datakeys: DataKeyManager | None = None,
        system_events: SystemEvents | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.audit = audit
        self.fingerprint_version = fingerprint_version
        self.datakeys = datakeys
        self.system_events = system_events
        self._rotation_lock = asyncio.Lock()
        self._locks = {kek: asyncio.Lock() for kek in DATA_KEY_KEKS}
        self._data_locks = {kek: asyncio.Lock() for kek in DATA_KEY_KEKS}

    async def usage(self) -> dict[str, Any]:
        """How many stored data keys each KEK version wraps, the fingerprint version
        the vault derives with, and each KEK's re-encryption run."""
        counts = await self.store.data_key_counts()
        return {
            "object": "vault.key_usage",
            "data_keys": {
                kek: {str(v): n for v, n in sorted(counts.get(kek, {}).items())}
                for kek in DATA_KEY_KEKS
            },
            "fingerprint_version": self.fingerprint_version,
            "jobs": {kek: _job_dict(await self.store.get_key_job(kek)) for kek in DATA_KEY_KEKS},
            "data_jobs": {
                kek: _job_dict(await self.store.get_key_job(f"{kek}:data")) for kek in DATA_KEY_KEKS
            },
        }

    async def rotated(self, kek: str, *, actor: str) -> dict[str, Any]:
        """``kek`` was rotated in the key service: take a data key under its newest
        version now, with the ``key.rotated`` events (module docstring)."""
        if kek not in DATA_KEY_KEKS:
            raise ResourceMissing("No stored data keys under this key name.")
        if self.datakeys is None or self.system_events is None:
            raise ResourceMissing("This vault does not renew its data keys on request.")
        async with self._rotation_lock:
            fetched = await self.keys.datakey(kek)
            version = fetched.kek_version
            events = await self.system_events.key_rotated(kek, version)
            await self.audit.record(
                "keys.rotated", actor=actor, object_id=kek, detail={"version": version}
            )
            try:
                data_key = await self.datakeys.renew(kek, fetched, events)
            except DuplicateError:
                # This version's events are stored (their ids are derived from it): a
                # retried call. The data key alone.
                events = []
                data_key = await self.datakeys.renew(kek, fetched, events)
        return {
            "object": "vault.key_rotation",
            "kek": kek,
            "version": version,
            "data_key": data_key,
            "events": len(events),
        }

    async def _remaining(self, kek: str, target: int) -> int:
        counts = (await self.store.data_key_counts()).get(kek, {})
        return sum(n for version, n in counts.items() if version < target)

    async def reencrypt_batch(
        self, kek: str, *, target_version: int, batch_size: int, actor: str
    ) -> dict[str, Any]:
        """Move one batch of ``kek``'s data keys to ``target_version`` (the key
        service's newest), starting or resuming the run."""
        if kek not in DATA_KEY_KEKS:
            raise ResourceMissing("No stored data keys under this key name.")
        if not 1 <= batch_size <= MAX_BATCH:
            raise InvalidRequestError(
                f"batch_size must be between 1 and {MAX_BATCH}.", param="batch_size"
            )
        if target_version < 1:
            raise InvalidRequestError("Expected a positive integer.", param="target_version")
        async with self._locks[kek]:
            return await self._batch(kek, target_version, batch_size, actor)

    async def _batch(self, kek: str, target: int, size: int, actor: str) -> dict[str, Any]:
        now = int(time.time())
        job = await self.store.get_key_job(kek)
        if job is None or job.finished is not None or job.target_version != target:
            job = KeyJob(kek, new_id("rr_", 16), target, "", 0, now, now)

        async def fetch(after: str) -> list[DataKeyRecord]:
            return await self.store.data_keys_below(kek, target, after, size)

        async def move(records: list[DataKeyRecord]) -> tuple[int, list[str], dict[str, str]]:
            moves, unreadable = await self._rewrapped(kek, records)
            versions = ",".join(str(v) for v in sorted({r.kek_version for r in records}))
            return await self.store.move_data_keys(moves), unreadable, {"from_versions": versions}

        return await self._walk(
            job,
            fetch=fetch,
            left=lambda: self._remaining(kek, target),
            move=move,
            event="keys.reencrypt",
            what="data keys",
            detail={"target_version": target},
            actor=actor,
        )

    async def _rewrapped(
        self, kek: str, records: list[DataKeyRecord]
    ) -> tuple[list[DataKeyMove], list[str]]:
        """``records`` re-wrapped by keyd under its newest version (50 per call, a few
        calls at once), and the ids of those under a destroyed version (they can never
        move). All or nothing otherwise: any other failure stores none of the batch."""
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def rewrap(chunk: list[DataKeyRecord]) -> list[tuple[bytes, int] | None]:
            async with gate:
                try:
                    wrapped, version = await self.keys.rewrap_many(kek, [r.wrapped for r in chunk])
                except KeyVersionUnavailable:
                    if len(chunk) == 1:
                        return [None]
                else:
                    return [(w, version) for w in wrapped]
            # One of the chunk is under a destroyed version: find which, one by one.
            return [pair for one in chunk for pair in await rewrap([one])]

        chunks = [records[i : i + _PER_CALL] for i in range(0, len(records), _PER_CALL)]
        results = [pair for part in await asyncio.gather(*map(rewrap, chunks)) for pair in part]
        moves: list[DataKeyMove] = []
        unreadable: list[str] = []
        for record, result in zip(records, results, strict=True):
            if result is None:
                unreadable.append(record.id)
            else:
                moves.append((record.id, record.kek_version, *result))
        return moves, unreadable

    async def _walk(
        self,
        job: KeyJob,
        *,
        fetch: Callable[[str], Awaitable[Sequence[_Walked]]],
        left: Callable[[], Awaitable[int]],
        move: Callable[[Any], Awaitable[tuple[int, list[str], dict[str, str]]]],
        event: str,
        what: str,
        detail: dict[str, Any],
        actor: str,
    ) -> dict[str, Any]:
        """One batch of a run (``job``): the next items after the cursor (``fetch``),
        moved (``move``: how many, the ids of those that can never move, and what the
        audit record adds), the cursor stored, one audit record. The end of a pass: items stored behind the cursor
        meanwhile are taken by another pass (``left`` counts what is still to move);
        the unmovable ones of this pass are not walked again, and the run ends."""
        now = int(time.time())
        records = await fetch(job.cursor)
        if not records and job.cursor and await left() > job.skipped:
            job = replace(job, cursor="", skipped=0, updated=now)
            records = await fetch("")
        if not records:
            done = replace(job, cursor="", updated=now, finished=now)
            await self.store.put_key_job(done)
            await self.audit.record(
                f"{event}.completed",
                actor=actor,
                object_id=job.kek.split(":")[0],
                detail={"run": job.run_id, **detail, "moved": job.moved, "unreadable": job.skipped},
            )
            return self._answer(done, moved=0, remaining=0)
        moved, unreadable, extra = await move(list(records))
        if unreadable:
            _log.error(
                f"{what} skipped by the re-encryption: they cannot be opened",
                run=job.run_id,
                ids=",".join(unreadable),
            )
        job = replace(
            job,
            cursor=records[-1].id,
            moved=job.moved + moved,
            skipped=job.skipped + len(unreadable),
            updated=now,
        )
        await self.store.put_key_job(job)
        await self.audit.record(
            f"{event}.batch",
            actor=actor,
            object_id=job.kek.split(":")[0],
            detail={
                "run": job.run_id,
                **detail,
                **extra,
                "moved": moved,
                "unreadable": ",".join(unreadable),
            },
        )
        return self._answer(job, moved=moved, remaining=max(await left() - job.skipped, 0))

    # -- card data -----------------------------------------------------------------------

    async def reencrypt_data_batch(
        self, kek: str, *, before: int, batch_size: int, actor: str
    ) -> dict[str, Any]:
        """Re-seal one batch of the cards whose ``kek`` data is under a data key made
        before ``before`` (Unix seconds) with a fresh data key, starting or resuming the
        run."""
        if kek not in DATA_KEY_KEKS:
            raise ResourceMissing("No stored data keys under this key name.")
        if not 1 <= batch_size <= MAX_BATCH:
            raise InvalidRequestError(
                f"batch_size must be between 1 and {MAX_BATCH}.", param="batch_size"
            )
        if not 0 < before <= int(time.time()):
            raise InvalidRequestError(
                "before must be a Unix time in the past (or now).", param="before"
            )
        if self.datakeys is None:
            raise ResourceMissing("This vault does not re-encrypt card data.")
        async with self._data_locks[kek]:
            return await self._data_batch(kek, before, batch_size, actor)

    async def _data_batch(self, kek: str, before: int, size: int, actor: str) -> dict[str, Any]:
        assert self.datakeys is not None
        now = int(time.time())
        name = f"{kek}:data"
        job = await self.store.get_key_job(name)
        if job is None or job.finished is not None or job.data_before != before:
            job = KeyJob(name, new_id("rr_", 16), 0, "", 0, now, now, data_before=before)
        # Nothing is sealed anew under a key the run moves away from.
        await self.datakeys.renew_if_made_before(kek, before)

        async def fetch(after: str) -> list[PaymentMethodRecord]:
            return await self.store.cards_sealed_before(kek, before, after, size)

        async def move(
            records: list[PaymentMethodRecord],
        ) -> tuple[int, list[str], dict[str, str]]:
            await self._unwrap_ahead(kek, records)
            reseals: list[CardReseal] = []
            unreadable: list[str] = []
            for record in records:
                try:
                    reseals.append(await self._reseal(kek, record))
                except (KeyVersionUnavailable, crypto.InvalidCiphertext):
                    unreadable.append(record.id)
            return await self.store.reseal_cards(kek, reseals), unreadable, {}

        return await self._walk(
            job,
            fetch=fetch,
            left=lambda: self.store.count_cards_sealed_before(kek, before),
            move=move,
            event="keys.reencrypt_data",
            what="cards",
            detail={"before": before},
            actor=actor,
        )

    async def _unwrap_ahead(self, kek: str, records: list[PaymentMethodRecord]) -> None:
        """The batch's distinct data keys unwrapped a few at a time into the data-key
        cache, instead of one round trip to keyd per card in turn. A key that cannot
        be unwrapped is left for :meth:`_reseal` to meet (and report)."""
        assert self.datakeys is not None
        datakeys = self.datakeys
        ids = {r.data_key_id if kek == "pan" else r.cvc_data_key_id for r in records}
        gate = asyncio.Semaphore(_CONCURRENCY * 2)

        async def unwrap(key_id: str) -> None:
            async with gate:
                await datakeys.for_decryption(key_id, kek)

        await asyncio.gather(*(unwrap(i) for i in ids if i), return_exceptions=True)

    async def _reseal(self, kek: str, record: PaymentMethodRecord) -> CardReseal:
        """``record``'s ``kek`` data opened and sealed again under the current data key.
        The plaintext is held in a buffer that is zeroed as soon as it is sealed again
        (``crypto.open_`` answers ``bytes``: that copy goes with the garbage collector,
        as on the forwarding path). Raises :class:`KeyVersionUnavailable` or
        :class:`crypto.InvalidCiphertext` for data that cannot be opened."""
        assert self.datakeys is not None
        mode = "live" if record.livemode else "test"
        if kek == "pan":
            old_id = record.data_key_id
            fields = [("number", record.number_ct), ("name", record.name_ct)]
        else:
            assert record.cvc_ct is not None
            assert record.cvc_data_key_id is not None
            old_id = record.cvc_data_key_id
            fields = [("cvc", record.cvc_ct)]
        old = await self.datakeys.for_decryption(old_id, kek)
        plains: list[bytearray | None] = []
        try:
            for field, ciphertext in fields:
                context = card_context(record.account_id, mode, record.id, field)
                plains.append(
                    None
                    if ciphertext is None
                    else bytearray(crypto.open_(old, ciphertext, context))
                )
            new_key_id, new = await self.datakeys.for_encryption(kek)
            sealed = [
                None
                if plain is None
                else crypto.seal(
                    new, plain, card_context(record.account_id, mode, record.id, field)
                )
                for (field, _), plain in zip(fields, plains, strict=True)
            ]
        finally:
            for plain in plains:
                if plain is not None:
                    plain[:] = bytes(len(plain))
        first = sealed[0]
        assert first is not None
        return (record.id, old_id, new_key_id, first, sealed[1] if len(sealed) > 1 else None)

    @staticmethod
    def _answer(job: KeyJob, *, moved: int, remaining: int) -> dict[str, Any]:
        return {
            "object": "vault.reencrypt_batch",
            "kek": job.kek,
            "run": job.run_id,
            "target_version": job.target_version,
            "moved": moved,
            "run_moved": job.moved,
            "remaining": remaining,
            "done": job.finished is not None,
        }
