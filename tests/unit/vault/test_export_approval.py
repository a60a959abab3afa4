"""Export approval (cardvault.vault.exports.approval): k of n shares of the ceremony's
key approve one export once, for a limited time; anything that does not fit wipes
every approval."""

from __future__ import annotations

import pytest

from cardvault import crypto
from cardvault.errors import ConfigurationError
from cardvault.vault.exports.approval import Approvals, load_check, split

TARGET = ("acct_1", "test", "acme")
OTHER = ("acct_1", "test", "other")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def made(shares: int = 3, threshold: int = 2) -> tuple[Approvals, list[str], Clock]:
    check, out = split(shares, threshold)
    clock = Clock()
    return Approvals(check, timeout=60, clock=clock), [s.to_text() for s in out], clock


def test_submit_approves_once_after_threshold_shares() -> None:
    approvals, shares, _ = made()
    progress, index = approvals.submit(TARGET, shares[0])
    assert (progress.progress, progress.approved, index) == (1, False, 1)
    assert not approvals.take(TARGET)
    progress, _ = approvals.submit(TARGET, shares[2])
    assert progress.approved
    assert not approvals.take(OTHER)  # approval is for its own target only
    assert approvals.take(TARGET)
    assert not approvals.take(TARGET)  # used up


def test_submit_rejects_a_share_of_another_split_and_wipes_everything() -> None:
    approvals, shares, _ = made()
    _, foreign = split(3, 2)
    approvals.submit(OTHER, shares[0])
    approvals.submit(OTHER, shares[1])  # OTHER granted
    approvals.submit(TARGET, shares[0])  # TARGET pending
    with pytest.raises(crypto.InvalidShare):
        approvals.submit(TARGET, foreign[1].to_text())
    assert approvals.status(TARGET)["progress"] == 0
    assert not approvals.take(OTHER)


def test_submit_rejects_the_same_share_twice_and_a_malformed_one() -> None:
    approvals, shares, _ = made()
    approvals.submit(TARGET, shares[0])
    with pytest.raises(crypto.InvalidShare):
        approvals.submit(TARGET, shares[0])
    assert approvals.status(TARGET)["progress"] == 0
    with pytest.raises(crypto.InvalidShare):
        approvals.submit(TARGET, "not a share")


def test_submit_rejects_shares_that_rebuild_another_key_of_the_same_split_id() -> None:
    # A check made for another key under the same split id: K fitting shares rebuild
    # a key that does not open it.
    approvals, shares, _ = made()
    other_check, _ = split(3, 2)
    forged = Approvals(
        type(approvals.check)(approvals.check.split_id, 3, 2, other_check.check), timeout=60
    )
    forged.submit(TARGET, shares[0])
    with pytest.raises(crypto.InvalidShare):
        forged.submit(TARGET, shares[1])
    assert not forged.take(TARGET)


def test_pending_and_granted_approvals_expire() -> None:
    approvals, shares, clock = made()
    approvals.submit(TARGET, shares[0])
    clock.now += 61
    progress, _ = approvals.submit(TARGET, shares[1])
    assert (progress.progress, progress.approved) == (1, False)
    approvals.submit(TARGET, shares[2])
    clock.now += 61
    assert not approvals.take(TARGET)


def test_split_refuses_a_threshold_of_one() -> None:
    with pytest.raises(ValueError, match="threshold"):
        split(3, 1)


def test_load_check_reads_the_ceremony_file_and_refuses_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    check, _ = split(5, 3)
    path = tmp_path / "a.json"
    path.write_text(check.to_json())
    assert load_check(path) == check
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ConfigurationError):
        load_check(path)
