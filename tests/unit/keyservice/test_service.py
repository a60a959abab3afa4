"""KeyService in process on a SQLiteKeyStore: unseal, data keys, rotation, restarts, leaks.

Every test is an ``async def`` run by :func:`async_test` (pytest-asyncio is not a
dependency). The store is initialized once per test with 5 shares, any 3 of which
unseal; time is a :class:`FakeClock` so that the unseal timeout can be crossed at once.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cardvault import crypto
from cardvault.config import load_settings
from cardvault.errors import (
    CiphertextInvalid,
    ConfigurationError,
    InvalidRequestError,
    KeyServiceSealed,
    ResourceMissing,
    UnsealShareInvalid,
)
from cardvault.keyservice.app import check_settings
from cardvault.keyservice.service import KeyService, UnsealProgress, initialize
from cardvault.keyservice.settings import KeyServiceSettings
from cardvault.storage import SQLiteKeyStore

SHARES, THRESHOLD = 5, 3
TIMEOUT = 60.0
ADMIN = "admin"


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop; fixtures still get injected."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Keyd:
    """An initialized key-service store and the shares ``initialize`` handed out."""

    path: Path
    store: SQLiteKeyStore
    # Kept out of repr so that a failing test does not print them.
    shares: list[str] = field(repr=False)
    share_values: list[bytes] = field(repr=False)
    clock: FakeClock = field(default_factory=FakeClock)

    async def service(self, *, timeout: float = TIMEOUT) -> KeyService:
        service = KeyService(self.store, unseal_timeout=timeout, clock=self.clock)
        await service.start()
        return service

    async def unsealed(self, indexes: Sequence[int] = (0, 1, 2)) -> KeyService:
        service = await self.service()
        await submit(service, [self.shares[i] for i in indexes])
        assert not service.sealed
        return service

    async def restart(self, service: KeyService) -> KeyService:
        """What a process restart does: seal, close the store, open it anew, start."""
        await service.seal(actor="shutdown")
        await self.store.close()
        self.store = SQLiteKeyStore(self.path)
        return await self.service()


async def _initialize(path: Path) -> tuple[SQLiteKeyStore, list[str], list[bytes]]:
    store = SQLiteKeyStore(path)
    shares = await initialize(store, shares=SHARES, threshold=THRESHOLD)
    texts = [share.to_text() for share in shares]
    values = [bytes(share.value) for share in shares]
    for share in shares:
        share.wipe()
    return store, texts, values


@pytest.fixture
def keyd(tmp_path: Path) -> Iterator[Keyd]:
    path = tmp_path / "keyd.db"
    store, texts, values = asyncio.run(_initialize(path))
    state = Keyd(path, store, texts, values)
    yield state
    asyncio.run(state.store.close())


@pytest.fixture
def foreign_shares(tmp_path: Path) -> list[str]:
    """Shares of another key service's root key (same N and K, another split)."""

    async def make() -> list[str]:
        store, texts, _ = await _initialize(tmp_path / "other.db")
        await store.close()
        return texts

    return asyncio.run(make())


async def submit(service: KeyService, shares: Sequence[str]) -> UnsealProgress:
    progress = UnsealProgress(service.sealed, 0, service.threshold)
    for share in shares:
        progress = await service.submit_share(share, actor=ADMIN)
    return progress


def forge(text: str) -> str:
    """The same share with one bit of its value changed and a valid checksum."""
    share = crypto.Share.from_text(text)
    value = bytearray(share.value)
    value[0] ^= 0x01
    return crypto.Share(
        split_id=share.split_id, threshold=share.threshold, index=share.index, value=value
    ).to_text()


def flip_bit(data: bytes, byte: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[byte] ^= 1 << bit
    return bytes(out)


async def assert_sealed_with_no_progress(service: KeyService) -> None:
    assert service.sealed
    assert service.status()["progress"] == 0
    with pytest.raises(KeyServiceSealed):
        service.datakey("pan")


# -- start-up --------------------------------------------------------------------------


@async_test
async def test_start_comes_up_sealed_and_refuses_every_key_operation(keyd: Keyd) -> None:
    service = await keyd.service()
    assert service.sealed
    status = service.status()
    assert status["sealed"] is True
    assert (status["threshold"], status["shares"], status["progress"]) == (3, 5, 0)
    assert status["seal_type"] == "shamir"
    assert status["keys"] == {}
    with pytest.raises(KeyServiceSealed):
        service.datakey("pan")
    with pytest.raises(KeyServiceSealed):
        service.unwrap("pan", b"\x02" * 77)
    with pytest.raises(KeyServiceSealed):
        service.rewrap("pan", b"\x02" * 77)
    with pytest.raises(KeyServiceSealed):
        service.derive("fingerprint", "acct_1")
    with pytest.raises(KeyServiceSealed):
        await service.rotate("pan", actor=ADMIN)
    with pytest.raises(KeyServiceSealed):
        await service.configure("pan", min_decryption_version=1, actor=ADMIN)


@async_test
async def test_start_refuses_an_uninitialized_store(tmp_path: Path) -> None:
    store = SQLiteKeyStore(tmp_path / "empty.db")
    try:
        with pytest.raises(ConfigurationError, match="not initialized"):
            await KeyService(store).start()
    finally:
        await store.close()


@async_test
async def test_initialize_refuses_to_replace_the_keys_of_an_initialized_store(
    keyd: Keyd,
) -> None:
    with pytest.raises(ConfigurationError, match="already initialized"):
        await initialize(keyd.store, shares=SHARES, threshold=THRESHOLD)
    # The original shares still unseal: nothing was replaced.
    await keyd.unsealed()


# -- unseal ----------------------------------------------------------------------------


@async_test
async def test_any_two_of_five_shares_leave_it_sealed(keyd: Keyd) -> None:
    for pair in itertools.combinations(range(SHARES), 2):
        service = await keyd.service()
        first = await service.submit_share(keyd.shares[pair[0]], actor=ADMIN)
        assert first == UnsealProgress(True, 1, THRESHOLD)
        second = await service.submit_share(keyd.shares[pair[1]], actor=ADMIN)
        assert second == UnsealProgress(True, 2, THRESHOLD)
        assert service.sealed
        assert service.status()["progress"] == 2
        with pytest.raises(KeyServiceSealed):
            service.datakey("pan")


@async_test
async def test_any_three_of_five_shares_unseal_to_the_same_keys(keyd: Keyd) -> None:
    reference = await keyd.unsealed((0, 1, 2))
    plaintext, wrapped, _ = reference.datakey("pan")
    combinations = list(itertools.combinations(range(SHARES), THRESHOLD))
    assert len(combinations) == 10
    for combo in [*combinations, (4, 2, 0), (3, 1, 4)]:
        service = await keyd.service()
        progress = await submit(service, [keyd.shares[i] for i in combo])
        assert progress == UnsealProgress(False, 0, THRESHOLD)
        assert not service.sealed
        # The same root key: KEKs open, and a key wrapped elsewhere unwraps here.
        assert service.unwrap("pan", wrapped) == plaintext
        assert sorted(service.status()["keys"]) == ["cvc", "fingerprint", "pan"]


@async_test
async def test_a_share_after_unsealing_changes_nothing(keyd: Keyd) -> None:
    service = await keyd.unsealed((0, 1, 2))
    progress = await service.submit_share(keyd.shares[3], actor=ADMIN)
    assert progress == UnsealProgress(False, 0, THRESHOLD)
    assert not service.sealed


def _typo(text: str) -> str:
    # Change one character of the base32 value: the checksum no longer matches.
    position = text.rindex("-") - 3
    replacement = "a" if text[position] != "a" else "b"
    return text[:position] + replacement + text[position + 1 :]


MALFORMED: dict[str, Callable[[str], str]] = {
    "empty": lambda _text: "",
    "garbage": lambda _text: "hello custodian",
    "typo": _typo,
    "truncated": lambda text: text[:-5],
    "checksum_removed": lambda text: text.rsplit("-", 1)[0],
    "other_format_version": lambda text: text.replace("cvshare1", "cvshare2", 1),
    "threshold_changed": lambda text: crypto.Share(
        split_id=crypto.Share.from_text(text).split_id,
        threshold=2,
        index=crypto.Share.from_text(text).index,
        value=bytes(crypto.Share.from_text(text).value),
    ).to_text(),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@async_test
async def test_submit_share_rejects_a_malformed_share_and_wipes_progress(
    keyd: Keyd, kind: str
) -> None:
    service = await keyd.service()
    await submit(service, keyd.shares[:2])
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(MALFORMED[kind](keyd.shares[2]), actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    # The two shares given before were discarded: they count again from one.
    assert await service.submit_share(keyd.shares[0], actor=ADMIN) == UnsealProgress(
        True, 1, THRESHOLD
    )
    await submit(service, keyd.shares[1:3])
    assert not service.sealed


@async_test
async def test_submit_share_rejects_a_share_of_another_split_and_wipes_progress(
    keyd: Keyd, foreign_shares: list[str]
) -> None:
    service = await keyd.service()
    await submit(service, keyd.shares[:2])
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(foreign_shares[2], actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    # A foreign share first is refused as well, before it counts for anything.
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(foreign_shares[0], actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    await submit(service, keyd.shares[2:5])
    assert not service.sealed


@async_test
async def test_submit_share_rejects_a_repeated_share_and_wipes_progress(keyd: Keyd) -> None:
    service = await keyd.service()
    await submit(service, keyd.shares[:2])
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(keyd.shares[0], actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    # The same share with different spacing and case is the same share.
    await service.submit_share(keyd.shares[1], actor=ADMIN)
    spaced = " ".join(keyd.shares[1][i : i + 8] for i in range(0, len(keyd.shares[1]), 8))
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(spaced.upper(), actor=ADMIN)
    await assert_sealed_with_no_progress(service)


@pytest.mark.parametrize("forged_position", [0, 1, 2])
@async_test
async def test_a_forged_share_is_caught_by_the_key_check_value(
    keyd: Keyd, forged_position: int
) -> None:
    shares = list(keyd.shares[:THRESHOLD])
    shares[forged_position] = forge(shares[forged_position])
    service = await keyd.service()
    # Its checksum is valid, so it counts until the K-th share rebuilds a wrong key.
    assert await submit(service, shares[: THRESHOLD - 1]) == UnsealProgress(
        True, THRESHOLD - 1, THRESHOLD
    )
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share(shares[THRESHOLD - 1], actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    events = await keyd.store.events()
    assert (events[-1]["action"], events[-1]["result"]) == ("unseal", "wrong_key")
    await submit(service, keyd.shares[:THRESHOLD])
    assert not service.sealed


@async_test
async def test_partial_unseal_progress_expires_after_the_timeout(keyd: Keyd) -> None:
    service = await keyd.service(timeout=TIMEOUT)
    await submit(service, keyd.shares[:2])
    keyd.clock.advance(TIMEOUT + 1)
    # The operator's view of progress already says the earlier shares are gone.
    assert service.status()["progress"] == 0
    progress = await service.submit_share(keyd.shares[2], actor=ADMIN)
    assert progress == UnsealProgress(True, 1, THRESHOLD)
    assert service.sealed
    events = await keyd.store.events()
    assert ("unseal_progress_expired", "wiped") in [(e["action"], e["result"]) for e in events]
    # Progress restarted at the third share: two more unseal.
    await submit(service, keyd.shares[3:5])
    assert not service.sealed


@async_test
async def test_partial_unseal_progress_within_the_timeout_is_kept(keyd: Keyd) -> None:
    service = await keyd.service(timeout=TIMEOUT)
    await service.submit_share(keyd.shares[0], actor=ADMIN)
    keyd.clock.advance(TIMEOUT / 2)
    await service.submit_share(keyd.shares[1], actor=ADMIN)
    # The timeout counts from the first share, not from the latest one.
    keyd.clock.advance(TIMEOUT / 2 - 1)
    assert service.status()["progress"] == 2
    await service.submit_share(keyd.shares[2], actor=ADMIN)
    assert not service.sealed


@async_test
async def test_partial_unseal_progress_times_out_from_the_first_share(keyd: Keyd) -> None:
    service = await keyd.service(timeout=TIMEOUT)
    await service.submit_share(keyd.shares[0], actor=ADMIN)
    keyd.clock.advance(TIMEOUT / 2)
    await service.submit_share(keyd.shares[1], actor=ADMIN)
    keyd.clock.advance(TIMEOUT / 2 + 1)
    assert await service.submit_share(keyd.shares[2], actor=ADMIN) == UnsealProgress(
        True, 1, THRESHOLD
    )


# -- seal ------------------------------------------------------------------------------


@async_test
async def test_seal_refuses_key_operations_again_and_wipes_keys(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    plaintext, wrapped, _ = service.datakey("pan")
    root = service._root
    keks = [ring.key(v) for ring in service._rings.values() for v in ring.versions]
    assert root is not None and len(keks) == 3
    await service.seal(actor=ADMIN)
    assert service.sealed
    assert service.status()["keys"] == {}
    assert root.wiped and all(kek.wiped for kek in keks)
    with pytest.raises(KeyServiceSealed):
        service.datakey("pan")
    with pytest.raises(KeyServiceSealed):
        service.unwrap("pan", wrapped)
    with pytest.raises(KeyServiceSealed):
        service.derive("fingerprint", "acct_1")
    # Unsealing again brings back the same keys.
    await submit(service, keyd.shares[2:5])
    assert service.unwrap("pan", wrapped) == plaintext


@async_test
async def test_seal_discards_partial_unseal_progress(keyd: Keyd) -> None:
    service = await keyd.service()
    await submit(service, keyd.shares[:2])
    await service.seal(actor=ADMIN)
    await assert_sealed_with_no_progress(service)
    assert await service.submit_share(keyd.shares[2], actor=ADMIN) == UnsealProgress(
        True, 1, THRESHOLD
    )


# -- data keys -------------------------------------------------------------------------


@async_test
async def test_datakey_returns_a_fresh_32_byte_key_that_unwrap_returns(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    plaintext, wrapped, version = service.datakey("pan")
    assert isinstance(plaintext, bytes) and len(plaintext) == 32
    assert version == 1
    header = crypto.read_wrapped_key_header(wrapped)
    assert (header.kek_name, header.kek_version) == ("pan", 1)
    assert plaintext not in wrapped
    assert service.unwrap("pan", wrapped) == plaintext
    other_plaintext, other_wrapped, _ = service.datakey("pan")
    assert other_plaintext != plaintext and other_wrapped != wrapped
    cvc_plaintext, cvc_wrapped, _ = service.datakey("cvc")
    assert service.unwrap("cvc", cvc_wrapped) == cvc_plaintext


@pytest.mark.parametrize(("wrapped_for", "unwrapped_as"), [("pan", "cvc"), ("cvc", "pan")])
@async_test
async def test_unwrap_refuses_a_key_wrapped_for_another_purpose(
    keyd: Keyd, wrapped_for: str, unwrapped_as: str
) -> None:
    service = await keyd.unsealed()
    _, wrapped, _ = service.datakey(wrapped_for)
    with pytest.raises(CiphertextInvalid) as info:
        service.unwrap(unwrapped_as, wrapped)
    assert info.value.param == "ciphertext"


@async_test
async def test_unwrap_refuses_a_wrapped_key_with_any_bit_flipped(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    _, wrapped, _ = service.datakey("pan")
    for byte in range(len(wrapped)):
        for bit in (0, 7):
            with pytest.raises(CiphertextInvalid):
                service.unwrap("pan", flip_bit(wrapped, byte, bit))


@async_test
async def test_unwrap_refuses_a_truncated_or_extended_wrapped_key(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    _, wrapped, _ = service.datakey("pan")
    for length in range(len(wrapped)):
        with pytest.raises(CiphertextInvalid):
            service.unwrap("pan", wrapped[:length])
    with pytest.raises(CiphertextInvalid):
        service.unwrap("pan", wrapped + b"\x00")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.derive("pan", "acct_1"),
        lambda s: s.derive("cvc", "acct_1"),
        lambda s: s.datakey("fingerprint"),
        lambda s: s.unwrap("fingerprint", b"\x02"),
        lambda s: s.rewrap("fingerprint", b"\x02"),
        lambda s: s.datakey("root"),
        lambda s: s.datakey("nope"),
        lambda s: s.derive("nope", "acct_1"),
    ],
)
@async_test
async def test_a_key_used_for_what_it_is_not_for_is_missing(
    keyd: Keyd, call: Callable[[KeyService], object]
) -> None:
    service = await keyd.unsealed()
    with pytest.raises(ResourceMissing):
        call(service)


# -- rotation, rewrap, min_decryption_version ------------------------------------------


@async_test
async def test_rotate_makes_new_data_keys_use_version_2_and_old_ones_still_unwrap(
    keyd: Keyd,
) -> None:
    service = await keyd.unsealed()
    old_plaintext, old_wrapped, _ = service.datakey("pan")
    result = await service.rotate("pan", actor=ADMIN)
    assert result["latest_version"] == 2 and result["versions"] == [1, 2]
    plaintext, wrapped, version = service.datakey("pan")
    assert version == 2
    assert crypto.read_wrapped_key_header(wrapped).kek_version == 2
    assert service.unwrap("pan", wrapped) == plaintext
    assert service.unwrap("pan", old_wrapped) == old_plaintext
    # Rotating one key leaves the others alone.
    assert crypto.read_wrapped_key_header(service.datakey("cvc")[1]).kek_version == 1


@async_test
async def test_rotate_refuses_an_unknown_key(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    with pytest.raises(ResourceMissing):
        await service.rotate("nope", actor=ADMIN)


@async_test
async def test_rewrap_moves_a_v1_key_to_v2_with_the_same_plaintext(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    plaintext, wrapped, _ = service.datakey("pan")
    await service.rotate("pan", actor=ADMIN)
    rewrapped, version = service.rewrap("pan", wrapped)
    assert version == 2
    assert crypto.read_wrapped_key_header(rewrapped).kek_version == 2
    assert service.unwrap("pan", rewrapped) == plaintext
    with pytest.raises(CiphertextInvalid):
        service.rewrap("pan", flip_bit(wrapped, len(wrapped) - 1))
    with pytest.raises(CiphertextInvalid):
        service.rewrap("cvc", wrapped)


@async_test
async def test_min_decryption_version_retires_v1_and_keeps_v2(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    _, v1_wrapped, _ = service.datakey("pan")
    await service.rotate("pan", actor=ADMIN)
    v2_plaintext, v2_wrapped, _ = service.datakey("pan")
    result = await service.configure("pan", min_decryption_version=2, actor=ADMIN)
    assert result["min_decryption_version"] == 2
    with pytest.raises(CiphertextInvalid):
        service.unwrap("pan", v1_wrapped)
    with pytest.raises(CiphertextInvalid):
        service.rewrap("pan", v1_wrapped)
    assert service.unwrap("pan", v2_wrapped) == v2_plaintext
    assert await keyd.store.min_decryption_versions() == {"pan": 2}


@pytest.mark.parametrize("minimum", [3, 0, -1, 2**40])
@async_test
async def test_configure_refuses_a_min_decryption_version_out_of_range(
    keyd: Keyd, minimum: int
) -> None:
    service = await keyd.unsealed()
    await service.rotate("pan", actor=ADMIN)
    _, v1_wrapped, _ = service.datakey("pan")
    with pytest.raises(InvalidRequestError) as info:
        await service.configure("pan", min_decryption_version=minimum, actor=ADMIN)
    assert info.value.param == "min_decryption_version"
    assert service.status()["keys"]["pan"]["min_decryption_version"] == 1
    assert await keyd.store.min_decryption_versions() == {}
    assert len(service.unwrap("pan", v1_wrapped)) == 32


@async_test
async def test_configure_refuses_an_unknown_key(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    with pytest.raises(ResourceMissing):
        await service.configure("nope", min_decryption_version=1, actor=ADMIN)


# -- derive ----------------------------------------------------------------------------


@async_test
async def test_derive_is_deterministic_per_account_and_version(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    key, version = service.derive("fingerprint", "acct_1")
    assert len(key) == 32 and version == 1
    assert service.derive("fingerprint", "acct_1") == (key, 1)
    assert service.derive("fingerprint", "acct_1", 1) == (key, 1)
    assert service.derive("fingerprint", "acct_2")[0] != key
    await service.rotate("fingerprint", actor=ADMIN)
    new_key, new_version = service.derive("fingerprint", "acct_1")
    assert new_version == 2 and new_key != key
    assert service.derive("fingerprint", "acct_1", 1) == (key, 1)
    # Another unsealing of the same store derives the same keys.
    other = await keyd.unsealed((2, 3, 4))
    assert other.derive("fingerprint", "acct_1", 1) == (key, 1)
    assert other.derive("fingerprint", "acct_1") == (new_key, 2)


@pytest.mark.parametrize("version", [0, -1, 3, 99])
@async_test
async def test_derive_refuses_a_version_that_is_not_held(keyd: Keyd, version: int) -> None:
    service = await keyd.unsealed()
    await service.rotate("fingerprint", actor=ADMIN)
    with pytest.raises(InvalidRequestError) as info:
        service.derive("fingerprint", "acct_1", version)
    assert info.value.param == "version"


@async_test
async def test_derive_refuses_a_retired_version(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    await service.rotate("fingerprint", actor=ADMIN)
    await service.configure("fingerprint", min_decryption_version=2, actor=ADMIN)
    with pytest.raises(InvalidRequestError):
        service.derive("fingerprint", "acct_1", 1)
    assert service.derive("fingerprint", "acct_1")[1] == 2


@pytest.mark.parametrize("context", ["", "acct 1", "ácct_1", "acct\n1", "a" * 300])
@async_test
async def test_derive_refuses_a_context_that_cannot_name_a_key(keyd: Keyd, context: str) -> None:
    # A client error, not a crash: the HTTP layer passes any non-empty string through.
    service = await keyd.unsealed()
    with pytest.raises(InvalidRequestError) as info:
        service.derive("fingerprint", context)
    assert info.value.param == "context"
    assert context.strip() == "" or context not in str(info.value)


@async_test
async def test_derive_takes_the_longest_context_that_fits_a_key_name(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    longest = "a" * (254 - len("fingerprint"))
    assert len(service.derive("fingerprint", longest)[0]) == 32
    with pytest.raises(InvalidRequestError):
        service.derive("fingerprint", longest + "a")


# -- restart ---------------------------------------------------------------------------


@async_test
async def test_restart_comes_back_sealed_and_keeps_every_key_and_setting(keyd: Keyd) -> None:
    service = await keyd.unsealed((0, 1, 2))
    pan_v1 = service.datakey("pan")
    await service.rotate("pan", actor=ADMIN)
    pan_v2 = service.datakey("pan")
    cvc_v1 = service.datakey("cvc")
    await service.rotate("cvc", actor=ADMIN)
    cvc_v2 = service.datakey("cvc")
    await service.configure("pan", min_decryption_version=2, actor=ADMIN)
    fingerprint_key = service.derive("fingerprint", "acct_1")
    before = service.status()["keys"]

    restarted = await keyd.restart(service)
    await assert_sealed_with_no_progress(restarted)
    await submit(restarted, [keyd.shares[i] for i in (4, 2, 3)])
    assert not restarted.sealed
    assert restarted.status()["keys"] == before
    assert restarted.unwrap("pan", pan_v2[1]) == pan_v2[0]
    assert restarted.unwrap("cvc", cvc_v1[1]) == cvc_v1[0]
    assert restarted.unwrap("cvc", cvc_v2[1]) == cvc_v2[0]
    with pytest.raises(CiphertextInvalid):  # min_decryption_version=2 persisted
        restarted.unwrap("pan", pan_v1[1])
    assert restarted.derive("fingerprint", "acct_1") == fingerprint_key
    # New data keys continue on the newest version, and the next rotation is v3.
    assert restarted.datakey("pan")[2] == 2
    assert (await restarted.rotate("pan", actor=ADMIN))["latest_version"] == 3


# -- development seal ------------------------------------------------------------------


@async_test
async def test_dev_seal_writes_a_private_key_file_and_unseals_from_it(tmp_path: Path) -> None:
    key_file = tmp_path / "dev" / "root.key"
    store = SQLiteKeyStore(tmp_path / "dev.db")
    try:
        shares = await initialize(store, shares=SHARES, threshold=THRESHOLD, dev_key_file=key_file)
        assert shares == []
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert len(key_file.read_bytes()) == 32

        service = KeyService(store)
        await service.start(dev_key_file=key_file)
        assert not service.sealed
        assert service.status()["seal_type"] == "dev"
        plaintext, wrapped, _ = service.datakey("pan")
        assert service.unwrap("pan", wrapped) == plaintext
        # Shares do not apply to a dev-sealed store.
        sealed = KeyService(store)
        await sealed.start()
        assert sealed.sealed
        with pytest.raises(InvalidRequestError):
            await sealed.submit_share("cvshare1-00000000-3-1-aaaa-00000000", actor=ADMIN)
    finally:
        await store.close()


@async_test
async def test_dev_seal_refuses_a_store_initialized_with_shares(keyd: Keyd, tmp_path: Path) -> None:
    key_file = tmp_path / "root.key"
    key_file.write_bytes(os.urandom(32))
    with pytest.raises(ConfigurationError):
        await KeyService(keyd.store).start(dev_key_file=key_file)


def _settings(tmp_path: Path, toml: str) -> KeyServiceSettings:
    config = tmp_path / "keyd.toml"
    config.write_text(toml)
    return load_settings(KeyServiceSettings, config, env={})


_SERVER = '[server]\ncert_file = "k.pem"\nkey_file = "k.key"\n'
_MTLS = 'client_ca_file = "ca.pem"\n'
_STORE = '[store]\nurl = "sqlite:////tmp/keyd.db"\n'
_DEV_SEAL = '[seal]\ntype = "dev"\ndev_key_file = "root.key"\n'


def test_check_settings_refuses_the_dev_seal_in_production(tmp_path: Path) -> None:
    settings = _settings(tmp_path, _SERVER + _MTLS + _STORE + _DEV_SEAL)
    assert settings.profile == "production"  # the default
    with pytest.raises(ConfigurationError, match=r"seal\.type"):
        check_settings(settings)


def test_check_settings_allows_the_dev_seal_in_development(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, 'profile = "development"\n' + _SERVER + _MTLS + _STORE + _DEV_SEAL
    )
    check_settings(settings)


def test_check_settings_requires_the_dev_key_file_for_the_dev_seal(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, 'profile = "development"\n' + _SERVER + _MTLS + _STORE + '[seal]\ntype = "dev"\n'
    )
    with pytest.raises(ConfigurationError, match=r"seal\.dev_key_file"):
        check_settings(settings)


@pytest.mark.parametrize("profile", ["production", "development"])
def test_check_settings_requires_a_client_ca_file(tmp_path: Path, profile: str) -> None:
    settings = _settings(tmp_path, f'profile = "{profile}"\n' + _SERVER + _STORE)
    with pytest.raises(ConfigurationError, match=r"server\.client_ca_file"):
        check_settings(settings)


def test_check_settings_accepts_shamir_in_production(tmp_path: Path) -> None:
    check_settings(_settings(tmp_path, _SERVER + _MTLS + _STORE))


# -- events ----------------------------------------------------------------------------


@async_test
async def test_events_record_unseal_attempts_unseal_and_seal(keyd: Keyd) -> None:
    service = await keyd.service()
    start = len(await keyd.store.events())
    with pytest.raises(UnsealShareInvalid):
        await service.submit_share("not a share", actor="mallory")
    await service.submit_share(keyd.shares[0], actor="alice")
    await service.submit_share(keyd.shares[1], actor="bob")
    await service.submit_share(keyd.shares[2], actor="carol")
    await service.submit_share(keyd.shares[3], actor="dave")
    await service.seal(actor="erin")
    events = (await keyd.store.events())[start:]
    assert [(e["actor"], e["action"], e["result"]) for e in events] == [
        ("mallory", "unseal_share", "rejected"),
        ("alice", "unseal_share", "accepted"),
        ("bob", "unseal_share", "accepted"),
        ("carol", "unseal_share", "accepted"),
        ("carol", "unseal", "ok"),
        ("dave", "unseal_share", "already_unsealed"),
        ("erin", "seal", "ok"),
    ]
    assert [e["detail"] for e in events[1:4]] == ["index=1", "index=2", "index=3"]


@async_test
async def test_events_record_start_rotate_and_config(keyd: Keyd) -> None:
    service = await keyd.unsealed()
    await service.rotate("pan", actor="admin")
    await service.configure("pan", min_decryption_version=2, actor="admin")
    actions = [(e["action"], e["result"], e["detail"]) for e in await keyd.store.events()]
    assert actions[0] == ("init", "ok", actions[0][2])
    assert ("start", "sealed", "") in actions
    assert ("rotate", "ok", "pan v2") in actions
    assert ("config", "ok", "pan min_decryption_version=2") in actions


# -- no key material anywhere ----------------------------------------------------------


def _encodings(secret: bytes) -> set[str]:
    b32 = base64.b32encode(secret).decode()
    forms = {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        b32.rstrip("="),
        b32.rstrip("=").lower(),
        repr(secret)[2:-1],
    }
    return {form for form in forms if len(form) >= 16}


def _exception_texts(exc: BaseException) -> list[str]:
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        if hasattr(seen, "to_dict"):
            texts.append(json.dumps(seen.to_dict()))
        seen = seen.__cause__ or seen.__context__
    return texts


@async_test
async def test_no_event_log_repr_or_error_holds_key_material(
    keyd: Keyd, foreign_shares: list[str]
) -> None:
    secrets: list[bytes] = list(keyd.share_values)
    errors: list[BaseException] = []
    outputs: list[str] = []

    async def expect_error(call: Awaitable[Any] | Callable[[], Any]) -> None:
        try:
            if callable(call):
                call()
            else:
                await call
        except Exception as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an error")

    with capture_logs() as logs:
        service = await keyd.service()
        forged = forge(keyd.shares[2])
        secrets.append(bytes(crypto.Share.from_text(forged).value))
        await expect_error(service.submit_share(_typo(keyd.shares[0]), actor=ADMIN))
        await expect_error(service.submit_share(foreign_shares[0], actor=ADMIN))
        await submit(service, keyd.shares[:1])
        await expect_error(service.submit_share(keyd.shares[0], actor=ADMIN))
        await submit(service, keyd.shares[:2])
        await expect_error(service.submit_share(forged, actor=ADMIN))
        outputs += [repr(service), json.dumps(service.status())]
        await submit(service, keyd.shares[:3])
        outputs += [repr(service), json.dumps(service.status())]

        # Everything secret that now exists: the root key, every KEK, data keys.
        root = crypto.shamir_combine(crypto.Share.from_text(t) for t in keyd.shares[:3])
        secrets.append(bytes(root))
        for ring in service._rings.values():
            outputs.append(repr(ring))
            for version in ring.versions:
                secrets.append(ring.key(version).expose_secret())
                outputs.append(repr(ring.key(version)))
        pan, pan_wrapped, _ = service.datakey("pan")
        cvc, _, _ = service.datakey("cvc")
        derived, _ = service.derive("fingerprint", "acct_1")
        secrets += [pan, cvc, derived]
        await expect_error(lambda: service.unwrap("cvc", pan_wrapped))
        await expect_error(lambda: service.unwrap("pan", flip_bit(pan_wrapped, 50)))
        await expect_error(lambda: service.derive("fingerprint", "acct 1"))
        await service.rotate("pan", actor=ADMIN)
        secrets.append(service._rings["pan"].latest.expose_secret())
        service.rewrap("pan", pan_wrapped)
        await expect_error(service.configure("pan", min_decryption_version=9, actor=ADMIN))
        await service.seal(actor=ADMIN)
        outputs += [repr(service), json.dumps(service.status())]
        await expect_error(lambda: service.datakey("pan"))

    assert any(entry["event"] == "key service unsealed" for entry in logs)
    assert len(errors) == 9
    outputs += [repr(entry) for entry in logs]
    outputs += [json.dumps(event) for event in await keyd.store.events()]
    for exc in errors:
        outputs += _exception_texts(exc)
    haystack = "\n".join(outputs)
    assert len(set(secrets)) == len(secrets)
    for secret in secrets:
        for form in _encodings(secret):
            assert form not in haystack, "key material found in an event, log, repr or error"
