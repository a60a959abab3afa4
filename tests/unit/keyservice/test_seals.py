"""The seals' pieces in one process: the wrapped Shamir form, the re-key and reseal
ceremonies on a real SQLite store, the PIN file's checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.errors import ConfigurationError, UnsealShareInvalid
from cardvault.keyservice import ceremony
from cardvault.keyservice.seals import TokenConfig, root_from_shares, split_root
from cardvault.keyservice.service import KeyService, initialize
from cardvault.storage import SQLiteKeyStore


def test_a_wrapped_split_rebuilds_the_root_and_only_its_own_shares_do() -> None:
    with crypto.Key.generate("root", 1) as root:
        meta, shares = split_root(root, 5, 3)
        other_meta, other = split_root(root, 5, 3)
        with root_from_shares(meta, crypto.shamir_combine(shares[2:5])) as rebuilt:
            assert crypto.key_check_value(rebuilt) == crypto.key_check_value(root)
        # The other split's shares rebuild its own unseal key: it opens nothing here.
        with pytest.raises(crypto.InvalidShare):
            root_from_shares(meta, crypto.shamir_combine(other[:3]))
        assert meta["split_id"] != other_meta["split_id"]
        assert "wrapped_root" in meta
        assert json.dumps(meta).find(root.expose_secret().hex()) == -1


def test_rekey_and_reseal_ceremonies_on_a_store(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteKeyStore(tmp_path / "keyd.db")
        try:
            first = await initialize(store, shares=3, threshold=2)
            texts = [s.to_text() for s in first]
            kcv = await store.get_meta("root_kcv")
            second = await ceremony.rekey(
                store, Recorder(None), shares=texts[:2], new_shares=4, new_threshold=3
            )
            assert await store.get_meta("root_kcv") == kcv
            with pytest.raises(ceremony.CeremonyError, match="another split"):
                await ceremony.rekey(
                    store, Recorder(None), shares=texts, new_shares=3, new_threshold=2
                )
            service = KeyService(store)
            await service.start()
            with pytest.raises(UnsealShareInvalid):
                await service.submit_share(texts[0], actor="admin")
            for share in second[:3]:
                await service.submit_share(share.to_text(), actor="admin")
            assert not service.sealed
            pan, wrapped, _ = service.datakey("pan")
            await service.seal(actor="admin")

            # A reseal to Shamir: a new root key (new check value), the KEKs unchanged.
            third = await ceremony.reseal(
                store,
                Recorder(None),
                to="shamir",
                shares=[s.to_text() for s in second[1:4]],
                new_shares=2,
                new_threshold=2,
                token=None,
            )
            assert await store.get_meta("root_kcv") != kcv
            service = KeyService(store)
            await service.start()
            for share in third:
                await service.submit_share(share.to_text(), actor="admin")
            assert service.unwrap("pan", wrapped) == pan
            actions = [e["action"] for e in await store.events()]
            assert "rekey" in actions
            assert "reseal" in actions
            for event in await store.events():
                assert not any(s.to_text() in event["detail"] for s in first + second + third)
        finally:
            await store.close()

    asyncio.run(go())


def test_the_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    config = TokenConfig(Path("/nonexistent.so"), "label", pin)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        config.read_pin()
    pin.chmod(0o600)
    assert config.read_pin() == "1234"
    missing = TokenConfig(Path("/nonexistent.so"), "label", tmp_path / "nope")
    with pytest.raises(ConfigurationError, match="pkcs11_pin_file"):
        missing.read_pin()
