"""A KEK version's end of life in the key service: states, retirement, and destruction
approved by K custodian shares (crypto-shredding)."""

from __future__ import annotations

import pytest

from cardvault.errors import (
    CiphertextInvalid,
    InvalidRequestError,
    KeyVersionUnavailable,
    UnsealShareInvalid,
)

from .test_service import ADMIN, THRESHOLD, Keyd, async_test, keyd  # noqa: F401


@async_test
async def test_a_retired_version_is_destroyed_by_k_shares_and_never_opens_again(keyd: Keyd) -> None:  # noqa: F811
    service = await keyd.unsealed()
    _, old, _ = service.datakey("pan")
    await service.rotate("pan", actor=ADMIN)
    moved, _ = service.rewrap("pan", old)
    assert service.status()["keys"]["pan"]["states"] == {"1": "decrypt_only", "2": "active"}
    # Not retired yet: refused before any share is looked at.
    with pytest.raises(InvalidRequestError):
        await service.destroy("pan", 1, share=keyd.shares[0], actor=ADMIN)
    await service.configure("pan", min_decryption_version=2, actor=ADMIN)
    assert service.status()["keys"]["pan"]["states"]["1"] == "retired"
    with pytest.raises(KeyVersionUnavailable):
        service.unwrap("pan", old)
    # A bad share wipes the approvals given so far.
    first = await service.destroy("pan", 1, share=keyd.shares[0], actor=ADMIN)
    assert (first["destroyed"], first["progress"]) == (False, 1)
    with pytest.raises(UnsealShareInvalid):
        await service.destroy("pan", 1, share="cvshare1-not-a-share", actor=ADMIN)
    for i in range(THRESHOLD - 1):
        answer = await service.destroy("pan", 1, share=keyd.shares[i], actor=ADMIN)
        assert answer["progress"] == i + 1
        assert not answer["destroyed"]
    doomed = service._rings["pan"].key(1)
    answer = await service.destroy("pan", 1, share=keyd.shares[THRESHOLD], actor=ADMIN)
    assert answer["destroyed"] is True
    assert doomed.wiped
    assert service.status()["keys"]["pan"]["states"] == {"1": "destroyed", "2": "active"}
    assert [k.version for k in await keyd.store.list_keks() if k.name == "pan"] == [2]
    # Lowering min_decryption_version again brings nothing back.
    await service.configure("pan", min_decryption_version=1, actor=ADMIN)
    with pytest.raises(KeyVersionUnavailable) as info:
        service.unwrap("pan", old)
    assert "destroyed" in info.value.message
    assert isinstance(info.value, CiphertextInvalid)
    # What was re-wrapped before the destroy still opens, also after a restart.
    restarted = await keyd.restart(service)
    await restarted.submit_share(keyd.shares[0], actor=ADMIN)
    await restarted.submit_share(keyd.shares[1], actor=ADMIN)
    await restarted.submit_share(keyd.shares[2], actor=ADMIN)
    assert restarted.unwrap("pan", moved)
    assert restarted.status()["keys"]["pan"]["states"]["1"] == "destroyed"
    events = [e["action"] for e in await keyd.store.events()]
    assert "destroy_approval" in events
    assert "destroy" in events
