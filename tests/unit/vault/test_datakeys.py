"""The vault's data-key manager: bounded use, bounded time, few key-service calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cardvault import crypto
from cardvault.storage import SQLiteVaultStore
from cardvault.vault.datakeys import DataKeyManager, DataKeyPolicy
from cardvault.vault.keyclient import DataKey


class FakeKeyService:
    """Stands in for the key service's HTTP API; counts calls. Keys are real."""

    def __init__(self) -> None:
        self.kek = crypto.Keyring.generate("pan")
        self.calls: dict[str, int] = {"datakey": 0, "unwrap": 0, "derive": 0}

    async def datakey(self, kek: str) -> DataKey:
        self.calls["datakey"] += 1
        dek = crypto.Key.generate("dek", 1)
        return DataKey(bytearray(dek.expose_secret()), self.kek.wrap_key(dek, kek), 1)

    async def unwrap(self, kek: str, wrapped: bytes) -> bytearray:
        self.calls["unwrap"] += 1
        return bytearray(self.kek.unwrap_key(wrapped, kek).expose_secret())

    async def derive(self, kek: str, context: str) -> tuple[bytearray, int]:
        self.calls["derive"] += 1
        return bytearray(crypto.derive_account_key(self.kek.latest, context).expose_secret()), 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(tmp_path: Path, body, policy: DataKeyPolicy | None = None):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        store = SQLiteVaultStore(tmp_path / "v.db")
        await store.migrate()
        ks, clock = FakeKeyService(), Clock()
        manager = DataKeyManager(store, ks, policy, clock=clock)  # type: ignore[arg-type]
        try:
            return await body(manager, ks, clock, store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_one_key_service_call_per_max_uses_encryptions(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        ids = [(await manager.for_encryption("pan"))[0] for _ in range(10_000)]
        return ks.calls["datakey"], len(set(ids))

    calls, distinct = run(tmp_path, body, DataKeyPolicy(max_uses=2_500))
    assert calls == 4
    assert distinct == 4


def test_default_policy_stays_under_one_call_per_10000_tokenizations(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        for _ in range(30_000):
            await manager.for_encryption("pan")
        return ks.calls["datakey"]

    assert run(tmp_path, body) <= 3


def test_a_data_key_is_retired_after_max_age(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        first, _ = await manager.for_encryption("pan")
        clock.now += 59
        same, _ = await manager.for_encryption("pan")
        clock.now += 2
        later, _ = await manager.for_encryption("pan")
        return first, same, later

    first, same, later = run(tmp_path, body, DataKeyPolicy(max_age=60))
    assert first == same
    assert later != first


def test_concurrent_requests_share_one_fetch(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        results = await asyncio.gather(*(manager.for_encryption("pan") for _ in range(200)))
        return ks.calls["datakey"], {r[0] for r in results}

    calls, ids = run(tmp_path, body)
    assert calls == 1
    assert len(ids) == 1


def test_the_wrapped_key_is_stored_before_first_use(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        dk_id, _ = await manager.for_encryption("pan")
        return await store.get_data_key(dk_id)

    record = run(tmp_path, body)
    assert record is not None
    assert record.kek == "pan"
    assert crypto.read_wrapped_key_header(record.wrapped).kek_name == "pan"


def test_decryption_keys_are_cached_for_a_bounded_time(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        dk_id, key = await manager.for_encryption("pan")
        sealed = crypto.seal(key, b"secret", {"f": "x"})
        manager.wipe()  # a fresh process: nothing cached
        k1 = await manager.for_decryption(dk_id, "pan")
        k2 = await manager.for_decryption(dk_id, "pan")
        after_hit = ks.calls["unwrap"]
        clock.now += 301
        k3 = await manager.for_decryption(dk_id, "pan")
        return crypto.open_(k3, sealed, {"f": "x"}), k1 is k2, after_hit, ks.calls["unwrap"]

    plain, same_object, after_hit, total = run(tmp_path, body, DataKeyPolicy(cache_ttl=300))
    assert plain == b"secret"
    assert same_object
    assert after_hit == 1
    assert total == 2


def test_account_keys_are_derived_once_per_account(tmp_path: Path) -> None:
    async def body(manager, ks, clock, store):  # type: ignore[no-untyped-def]
        a1 = await manager.account_key("acct_a")
        a2 = await manager.account_key("acct_a")
        b = await manager.account_key("acct_b")
        return (
            ks.calls["derive"],
            crypto.fingerprint(a1, b"1") == crypto.fingerprint(a2, b"1"),
            crypto.fingerprint(a1, b"1") != crypto.fingerprint(b, b"1"),
        )

    calls, same, different = run(tmp_path, body)
    assert calls == 2
    assert same
    assert different
