"""The card environment's own events: the ids of ``key.rotated`` are derived from what
they say, so that a retried announcement meets its own events in the store."""

from __future__ import annotations

from cardvault.vault.ids import looks_like_id
from cardvault.vault.systemevents import derived_event_id


def test_derived_event_id_is_an_event_id_and_the_same_for_the_same_facts() -> None:
    one = derived_event_id("key.rotated", "pan", "2", "acct_1", "test")
    assert looks_like_id(one, "evt_") and len(one) == len("evt_") + 24
    assert one == derived_event_id("key.rotated", "pan", "2", "acct_1", "test")


def test_derived_event_id_differs_with_any_fact() -> None:
    base = ("key.rotated", "pan", "2", "acct_1", "test")
    ids = {derived_event_id(*base)}
    for i, other in enumerate(["key.other", "cvc", "3", "acct_2", "live"]):
        changed = list(base)
        changed[i] = other
        ids.add(derived_event_id(*changed))
    assert len(ids) == 6
