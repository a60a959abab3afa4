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


class SlowKeyService(FakeKeyService):
    """Each call yields to the event loop, as a real round trip does, and may fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    async def unwrap(self, kek: str, wrapped: bytes) -> bytearray:
        await asyncio.sleep(0.01)
        if self.fail:
            self.calls["unwrap"] += 1
            raise ConnectionError("key service unreachable")
        return await super().unwrap(kek, wrapped)

    async def derive(self, kek: str, context: str) -> tuple[bytearray, int]:
        await asyncio.sleep(0.01)
        if self.fail:
            self.calls["derive"] += 1
            raise ConnectionError("key service unreachable")
        return await super().derive(kek, context)


def run_slow(tmp_path: Path, body):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        store = SQLiteVaultStore(tmp_path / "v.db")
        await store.migrate()
        ks = SlowKeyService()
        manager = DataKeyManager(store, ks)  # type: ignore[arg-type]
        try:
            return await body(manager, ks, store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_concurrent_misses_of_one_account_key_share_one_derive(tmp_path: Path) -> None:
    async def body(manager, ks, store):  # type: ignore[no-untyped-def]
        keys = await asyncio.gather(
            *(manager.account_key("acct_a") for _ in range(100)),
            *(manager.account_key("acct_b") for _ in range(100)),
        )
        return ks.calls["derive"], {id(k) for k in keys[:100]}, {id(k) for k in keys[100:]}

    calls, a_keys, b_keys = run_slow(tmp_path, body)
    assert calls == 2  # one per account, not one per request
    assert len(a_keys) == 1
    assert len(b_keys) == 1
    assert a_keys != b_keys


def test_concurrent_misses_of_one_data_key_share_one_unwrap(tmp_path: Path) -> None:
    async def body(manager, ks, store):  # type: ignore[no-untyped-def]
        dk_id, key = await manager.for_encryption("pan")
        sealed = crypto.seal(key, b"secret", {"f": "x"})
        manager.wipe()
        keys = await asyncio.gather(*(manager.for_decryption(dk_id, "pan") for _ in range(100)))
        return ks.calls["unwrap"], {crypto.open_(k, sealed, {"f": "x"}) for k in keys}

    calls, plains = run_slow(tmp_path, body)
    assert calls == 1
    assert plains == {b"secret"}


def test_a_failed_shared_fetch_fails_every_waiter_and_the_next_request_retries(
    tmp_path: Path,
) -> None:
    async def body(manager, ks, store):  # type: ignore[no-untyped-def]
        ks.fail = True
        outcomes = await asyncio.gather(
            *(manager.account_key("acct_a") for _ in range(20)), return_exceptions=True
        )
        failed_calls = ks.calls["derive"]
        ks.fail = False
        key = await manager.account_key("acct_a")
        return outcomes, failed_calls, ks.calls["derive"], key

    outcomes, failed_calls, calls, key = run_slow(tmp_path, body)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert failed_calls == 1
    assert calls == 2
    assert key is not None


def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(tmp_path: Path) -> None:
    async def body(manager, ks, store):  # type: ignore[no-untyped-def]
        first = asyncio.ensure_future(manager.account_key("acct_a"))
        second = asyncio.ensure_future(manager.account_key("acct_a"))
        await asyncio.sleep(0)
        first.cancel()
        key = await second
        return first.cancelled(), key, ks.calls["derive"]

    cancelled, key, calls = run_slow(tmp_path, body)
    assert cancelled
    assert key is not None
    assert calls == 1


def test_a_key_fetched_after_wipe_is_not_cached(tmp_path: Path) -> None:
    async def body(manager, ks, store):  # type: ignore[no-untyped-def]
        waiting = asyncio.ensure_future(manager.account_key("acct_a"))
        await asyncio.sleep(0)  # the fetch is under way
        manager.wipe()  # shutting down: the fetch is cancelled, nothing is cached
        outcome = await asyncio.gather(waiting, return_exceptions=True)
        cached = manager._account_keys.get("acct_a")
        return outcome, cached

    (outcome,), cached = run_slow(tmp_path, body)
    assert isinstance(outcome, asyncio.CancelledError)
    assert cached is None


def test_a_key_that_leaves_the_cache_is_zeroed_once_no_request_uses_it() -> None:
    from cardvault.vault.datakeys import _TtlCache

    now = [0.0]
    cache = _TtlCache(size=1, ttl=10.0, clock=lambda: now[0])
    evicted_buffer, expired_buffer = bytearray(b"\x01" * 32), bytearray(b"\x02" * 32)
    cache.put("dk_a", crypto.Key("dk_a", 1, evicted_buffer))
    in_use = cache.get("dk_a")  # a request holds it
    cache.put("dk_b", crypto.Key("dk_b", 1, expired_buffer))  # evicts dk_a
    assert cache.get("dk_a") is None
    assert evicted_buffer == bytearray(b"\x01" * 32)  # still usable by that request
    del in_use
    assert evicted_buffer == bytearray(32)
    now[0] = 11.0
    assert cache.get("dk_b") is None  # expired: dropped, nothing else refers to it
    assert expired_buffer == bytearray(32)
