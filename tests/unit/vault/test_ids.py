"""Object ids: prefix, length, alphabet, and no bias from the byte-to-symbol mapping."""

from __future__ import annotations

import string

import pytest

from cardvault.vault import service
from cardvault.vault.service import new_id

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
    monkeypatch.setattr(service.secrets, "token_bytes", lambda n: bytes(range(256))[:n])
    assert new_id("", 24) == "".join(ALPHABET[b % 62] for b in range(24))
    stream = iter([bytes(range(240, 256)) + bytes(range(16))] * 4)
    monkeypatch.setattr(service.secrets, "token_bytes", lambda n: next(stream))
    expected = [ALPHABET[b % 62] for b in list(range(240, 248)) + list(range(16))]
    assert new_id("", 24) == "".join(expected)
