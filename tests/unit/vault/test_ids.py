"""Object ids: prefix, length, alphabet, and no bias from the byte-to-symbol mapping."""

from __future__ import annotations

import string

import pytest

from cardvault.vault import ids as vault_ids
from cardvault.vault.ids import new_id

ALPHABET = string.ascii_letters + string.digits


def test_ids_have_the_prefix_the_length_and_only_letters_and_digits() -> None:
    ids = {new_id("pm_") for _ in range(2000)}
    assert len(ids) == 2000
    for value in ids:
        assert value.startswith("pm_")
        assert len(value) == 3 + 24
        assert set(value[3:]) <= set(ALPHABET)
    assert len(new_id("acct_", 16)) == 5 + 16


def test_each_byte_maps_to_its_symbol_and_the_biased_bytes_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every byte value once, in order: the id is b % 62 for b < 248, in order, and the
    # eight values 248-255 (which would favour the first eight symbols) never appear.
    monkeypatch.setattr(vault_ids.secrets, "token_bytes", lambda n: bytes(range(256))[:n])
    assert new_id("", 24) == "".join(ALPHABET[b % 62] for b in range(24))
    stream = iter([bytes(range(240, 256)) + bytes(range(16))] * 4)
    monkeypatch.setattr(vault_ids.secrets, "token_bytes", lambda n: next(stream))
    expected = [ALPHABET[b % 62] for b in list(range(240, 248)) + list(range(16))]
    assert new_id("", 24) == "".join(expected)


def test_time_ordered_ids_sort_by_the_time_they_were_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Milliseconds that need one more symbol each, and neighbours: the ids sort as the
    # times do, whatever the random part.
    moments = [0, 1, 61, 62, 3843, 3844, 1_764_000_000_000, 1_764_000_000_001, 62**8 - 1]
    ids = []
    for ms in moments:
        monkeypatch.setattr(vault_ids.time, "time_ns", lambda ms=ms: ms * 1_000_000 + 999_999)
        ids.append(vault_ids.time_ordered_id("pm_"))
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert value.startswith("pm_")
        assert len(value) == 3 + 24
        assert set(value[3:]) <= set(ALPHABET)
    # The head is the time: 0 ms is all zeros, 62**8 - 1 ms is all "z".
    assert ids[0][3:11] == "00000000"
    assert ids[-1][3:11] == "zzzzzzzz"
    assert ids[3][3:11] == "00000010"


def test_time_ordered_ids_made_in_one_millisecond_differ() -> None:
    # Thousands of ids share a millisecond under load; the random part tells them apart.
    ids = [vault_ids.time_ordered_id("fwdreq_") for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert len({value[7:15] for value in ids}) < 2000


def test_a_time_ordered_id_needs_room_for_a_random_part() -> None:
    with pytest.raises(ValueError, match="more than 8"):
        vault_ids.time_ordered_id("pm_", 8)
    assert len(vault_ids.time_ordered_id("pm_", 9)) == 3 + 9
