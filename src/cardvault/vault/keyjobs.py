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
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cardvault.audit.recorder import Recorder
from cardvault.errors import InvalidRequestError, ResourceMissing
from cardvault.storage.base import DataKeyMove, KeyJob, VaultStore
from cardvault.vault.ids import new_id
from cardvault.vault.keyclient import KeyServiceClient

__all__ = ["DATA_KEY_KEKS", "MAX_BATCH", "KeyMaintenance"]

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
    ) -> None:
        self.store = store
        self.keys = keys
        self.audit = audit
        self.fingerprint_version = fingerprint_version
        self._locks = {kek: asyncio.Lock() for kek in DATA_KEY_KEKS}

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
        records = await self.store.data_keys_below(kek, target, job.cursor, size)
        # The end of one pass: anything stored behind the cursor meanwhile is below
        # the target still, and the next pass takes it.
        if not records and job.cursor and await self._remaining(kek, target):
            job = KeyJob(kek, job.run_id, target, "", job.moved, job.started, now)
            records = await self.store.data_keys_below(kek, target, "", size)
        if not records:
            done = KeyJob(kek, job.run_id, target, "", job.moved, job.started, now, now)
            await self.store.put_key_job(done)
            await self.audit.record(
                "keys.reencrypt.completed",
                actor=actor,
                object_id=kek,
                detail={"run": job.run_id, "target_version": target, "moved": job.moved},
            )
            return self._answer(done, moved=0, remaining=0)
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def rewrap(chunk: list[bytes]) -> list[tuple[bytes, int]]:
            async with gate:
                wrapped, version = await self.keys.rewrap_many(kek, chunk)
                return [(w, version) for w in wrapped]

        # All or nothing per batch: a failure stores none of it (the next call redoes it).
        chunks = [
            [r.wrapped for r in records[i : i + _PER_CALL]]
            for i in range(0, len(records), _PER_CALL)
        ]
        results = [pair for part in await asyncio.gather(*map(rewrap, chunks)) for pair in part]
        moves: list[DataKeyMove] = [
            (record.id, record.kek_version, wrapped, version)
            for record, (wrapped, version) in zip(records, results, strict=True)
        ]
        moved = await self.store.move_data_keys(moves)
        job = KeyJob(kek, job.run_id, target, records[-1].id, job.moved + moved, job.started, now)
        await self.store.put_key_job(job)
        await self.audit.record(
            "keys.reencrypt.batch",
            actor=actor,
            object_id=kek,
            detail={
                "run": job.run_id,
                "target_version": target,
                "moved": moved,
                "from_versions": ",".join(str(v) for v in sorted({r.kek_version for r in records})),
            },
        )
        return self._answer(job, moved=moved, remaining=await self._remaining(kek, target))

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
