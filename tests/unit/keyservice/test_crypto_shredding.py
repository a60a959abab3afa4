"""Crypto-shredding: what it takes for a destroyed KEK version to be gone from backups
too, shown on a real SQLite key store with the service in this process.

Destroying a version deletes its sealed material from the live database. A backup of
the database taken before the destroy still holds that material sealed under the root
key, so the backup together with custodian shares of that root still opens it: a
destroy alone shreds nothing that was backed up. Resealing afterwards (a new root key,
new shares) and destroying the old shares is what makes the backup unreadable: with the
new shares it opens nothing, and the destroyed version is nowhere else. Cards
re-encrypted before the destroy still decrypt throughout (docs/keys.md, "Destroying a
version").
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from cardvault.audit.recorder import Recorder
from cardvault.errors import CiphertextInvalid, UnsealShareInvalid
from cardvault.keyservice import ceremony
from cardvault.keyservice.service import KeyService, initialize
from cardvault.storage import SQLiteKeyStore


async def _unsealed(db: Path, shares: list[str]) -> tuple[SQLiteKeyStore, KeyService]:
    store = SQLiteKeyStore(db)
    service = KeyService(store)
    await service.start()
    for share in shares:
        await service.submit_share(share, actor="admin")
    assert not service.sealed
    return store, service


def test_a_destroyed_version_is_shredded_from_backups_only_by_a_reseal(tmp_path: Path) -> None:
    async def go() -> None:
        live = tmp_path / "keyd.db"
        store = SQLiteKeyStore(live)
        old_shares = [s.to_text() for s in await initialize(store, shares=3, threshold=2)]
        await store.close()

        store, service = await _unsealed(live, old_shares[:2])
        old_key, old_wrapped, v1 = service.datakey("pan")  # a card left under v1
        await service.rotate("pan", actor="admin")
        moved, v2 = service.rewrap("pan", old_wrapped)  # a card re-encrypted to v2
        assert (v1, v2) == (1, 2)
        await service.seal(actor="admin")
        await store.close()
        backup = tmp_path / "backup-before-destroy.db"
        shutil.copyfile(live, backup)

        store, service = await _unsealed(live, old_shares[:2])
        await service.configure("pan", min_decryption_version=2, actor="admin")
        await service.destroy("pan", 1, share=old_shares[0], actor="admin")
        done = await service.destroy("pan", 1, share=old_shares[2], actor="admin")
        assert done["destroyed"] is True
        with pytest.raises(CiphertextInvalid):
            service.unwrap("pan", old_wrapped)
        assert service.unwrap("pan", moved) == old_key
        await service.seal(actor="admin")

        # The destroy alone: the backup and the old shares still open version 1.
        copy = tmp_path / "copy-1.db"
        shutil.copyfile(backup, copy)
        copy_store, restored = await _unsealed(copy, old_shares[1:])
        assert restored.unwrap("pan", old_wrapped) == old_key
        await copy_store.close()

        # A reseal: a new root key and new shares; the old shares are then destroyed.
        new_shares = [
            s.to_text()
            for s in await ceremony.reseal(
                store,
                Recorder(None),
                to="shamir",
                shares=old_shares[:2],
                new_shares=3,
                new_threshold=2,
                token=None,
            )
        ]
        await store.close()
        store, service = await _unsealed(live, new_shares[:2])
        assert service.unwrap("pan", moved) == old_key  # re-encrypted cards still decrypt
        new_root = await store.get_meta("root_kcv")
        with pytest.raises(CiphertextInvalid):
            service.unwrap("pan", old_wrapped)
        await store.close()

        # The backup with the shares that remain (the new ones) opens nothing.
        copy = tmp_path / "copy-2.db"
        shutil.copyfile(backup, copy)
        copy_store = SQLiteKeyStore(copy)
        restored = KeyService(copy_store)
        await restored.start()
        # Another root key altogether (its check value differs): the new shares are of
        # another split, and refused at the first.
        assert await copy_store.get_meta("root_kcv") != new_root
        with pytest.raises(UnsealShareInvalid):
            await restored.submit_share(new_shares[0], actor="admin")
        assert restored.sealed
        await copy_store.close()

    asyncio.run(go())
