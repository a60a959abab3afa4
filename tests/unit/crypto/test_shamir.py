"""Custodian shares: encoding, checksum, mismatches, and the key check value."""

from __future__ import annotations

import itertools
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.crypto import (
    InvalidShare,
    Key,
    KeyCheckMismatch,
    Share,
    generate_key,
    key_check_value,
    shamir_combine,
    shamir_split,
    verify_key_check_value,
)

from ._support import KAT_KEY, counting_bytes

# Known answer: shamir_split(bytes(range(32)), 5, 3,
#   random_source_for_tests=counting_bytes(0x40)), i.e. split id 40414243 and then
# coefficients 44 45 46 ... in the documented order. Made by this module; the
# coefficient arithmetic itself has hand-computed vectors in test_hazmat_shamir.py.
SHARES_KAT = [
    "cvshare1-40414243-3-1-aeaagaqfaqdqmciibmfa2dapbyiraeyscukbofqzdanruhi4d4pa-d51ec775",
    "cvshare1-40414243-3-2-q6fk3iftx347j37cyxenxvsrlrlvu7lqmnxcsjb7gikrqcygg45a-acd57a76",
    "cvshare1-40414243-3-3-q2f2zinsx74pl3xdyte5vv2qlvlfw7drmjxsqjj6gmkbscqhgy5q-07b0b699",
    "cvshare1-40414243-3-4-g4pml3etxi5bgzcns274b2o762i3qy2kguojznoc5mybszsp4deq-53da53d8",
    "cvshare1-40414243-3-5-gyp4j3msxm5rezkms67md2g666ilsyslgqoz3ngd5iyrqz2o4hea-0700c4b7",
]


def test_shamir_split_matches_known_answer() -> None:
    shares = shamir_split(KAT_KEY, 5, 3, random_source_for_tests=counting_bytes(0x40))
    assert [share.to_text() for share in shares] == SHARES_KAT


def test_known_answer_shares_rebuild_the_secret_from_any_three() -> None:
    shares = [Share.from_text(text) for text in SHARES_KAT]
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(subset) == bytearray(KAT_KEY)


@settings(max_examples=25, deadline=None)
@given(shares=st.integers(min_value=2, max_value=6), data=st.data())
def test_any_threshold_shares_rebuild_a_root_key(shares: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(min_value=2, max_value=shares))
    root = generate_key()
    texts = [share.to_text() for share in shamir_split(root, shares, threshold)]
    for subset in itertools.combinations(texts, threshold):
        assert shamir_combine(Share.from_text(text) for text in subset) == root


def test_shamir_combine_refuses_fewer_than_threshold_shares() -> None:
    shares = [Share.from_text(text) for text in SHARES_KAT]
    with pytest.raises(InvalidShare, match="3 shares are needed, 2 were given"):
        shamir_combine(shares[:2])


def test_lowering_the_threshold_is_caught_by_the_key_check_value() -> None:
    # A custodian who rewrites two shares to claim threshold 2 (and recomputes their
    # checksums) gets past the share checks, but the rebuilt key is wrong.
    expected = key_check_value(Key("root", 1, KAT_KEY))
    forged = []
    for text in SHARES_KAT[:2]:
        share = Share.from_text(text)
        forged.append(
            Share(split_id=share.split_id, threshold=2, index=share.index, value=share.value)
        )
    rebuilt = shamir_combine(forged)
    assert rebuilt != bytearray(KAT_KEY)
    with pytest.raises(KeyCheckMismatch):
        verify_key_check_value(Key("root", 1, rebuilt), expected)
    genuine = shamir_combine(Share.from_text(text) for text in SHARES_KAT[2:])
    verify_key_check_value(Key("root", 1, genuine), expected)


def test_a_corrupted_share_value_is_caught_by_the_key_check_value() -> None:
    expected = key_check_value(Key("root", 1, KAT_KEY))
    shares = [Share.from_text(text) for text in SHARES_KAT[:3]]
    shares[1].value[0] ^= 0x01
    with pytest.raises(KeyCheckMismatch):
        verify_key_check_value(Key("root", 1, shamir_combine(shares)), expected)


@settings(max_examples=300)
@given(data=st.data())
def test_from_text_detects_any_single_mistyped_character(data: st.DataObject) -> None:
    text = SHARES_KAT[1]
    position = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    replacement = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz234567890-"))
    if replacement == text[position]:
        return
    mistyped = text[:position] + replacement + text[position + 1 :]
    with pytest.raises(InvalidShare):
        Share.from_text(mistyped)


def test_from_text_detects_swapped_adjacent_characters() -> None:
    text = SHARES_KAT[0]
    for i in range(len(text) - 1):
        if text[i] == text[i + 1]:
            continue
        swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        with pytest.raises(InvalidShare):
            Share.from_text(swapped)


def test_from_text_accepts_upper_case_and_grouping_whitespace() -> None:
    text = SHARES_KAT[2]
    grouped = " ".join(text[i : i + 5] for i in range(0, len(text), 5)).upper()
    assert Share.from_text(f"  {grouped}\n").to_text() == text


def test_from_text_refuses_other_formats_with_a_clear_message() -> None:
    with pytest.raises(InvalidShare, match="not a cardvault share"):
        Share.from_text("cvshare2-" + SHARES_KAT[0][9:])
    with pytest.raises(InvalidShare, match="malformed"):
        Share.from_text("cvshare1-40414243-3-1")


def test_shamir_combine_refuses_mixed_splits_and_repeated_shares() -> None:
    ours = [Share.from_text(text) for text in SHARES_KAT]
    theirs = shamir_split(KAT_KEY, 5, 3)
    with pytest.raises(InvalidShare, match="different splits"):
        shamir_combine([ours[0], ours[1], theirs[2]])
    with pytest.raises(InvalidShare, match="given twice"):
        shamir_combine([ours[0], ours[1], Share.from_text(SHARES_KAT[1])])
    with pytest.raises(InvalidShare, match="no shares"):
        shamir_combine([])


def test_shamir_split_refuses_threshold_of_one() -> None:
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(KAT_KEY, 3, 1)


def test_share_repr_hides_value_and_share_refuses_pickle() -> None:
    share = Share.from_text(SHARES_KAT[0])
    assert repr(share) == "Share(split_id='40414243', index=1, threshold=3)"
    assert share.value.hex() not in repr(share)
    with pytest.raises(TypeError):
        pickle.dumps(share)
    share.wipe()
    assert share.value == bytearray(32)
