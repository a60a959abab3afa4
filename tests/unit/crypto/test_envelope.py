"""Envelopes: seal/open_, the layout, the context binding, and the one opaque error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cardvault.crypto import (
    InvalidCiphertext,
    Key,
    encode_context,
    open_,
    read_envelope_header,
    seal,
)

from ._support import KAT_CONTEXT, KAT_KEY, KAT_NONCE, fixed_nonce, flip_bit

PAN = b"4242424242424242"

# Known-answer vector for envelope format 0x01. Made with
#   seal(Key("pan", 1, bytes(range(32))), b"4242424242424242", KAT_CONTEXT,
#        nonce_source_for_tests=fixed_nonce(bytes(range(0xa0, 0xac))))
# and checked independently below by building the documented layout with
# cryptography's AESGCM directly. If this changes, every stored card is unreadable.
ENVELOPE_KAT = bytes.fromhex(
    "01"  # format
    "03" "70616e"  # key name "pan"
    "00000001"  # key version 1
    "a0a1a2a3a4a5a6a7a8a9aaab"  # nonce
    "d22a481f71f9368d5657b3e13348f4ec"  # ciphertext (16 bytes)
    "f5d26d086ea07be7a5b88236b37a02e8"  # tag
)  # fmt: skip

# The canonical context encoding of KAT_CONTEXT, written out by hand from the spec:
# u32 count, then u32-length-prefixed key and value, keys in ascending byte order.
CONTEXT_KAT = (
    b"\x00\x00\x00\x04"
    b"\x00\x00\x00\x07account" b"\x00\x00\x00\x06acct_1"
    b"\x00\x00\x00\x05field" b"\x00\x00\x00\x06number"
    b"\x00\x00\x00\x04mode" b"\x00\x00\x00\x04test"
    b"\x00\x00\x00\x06object" b"\x00\x00\x00\x06pm_123"
)  # fmt: skip


@pytest.fixture
def key() -> Key:
    return Key.generate("pan", 1)


def _kat_key() -> Key:
    return Key("pan", 1, KAT_KEY)


contexts = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), min_size=1)


# --- known answers ------------------------------------------------------------------


def test_encode_context_matches_known_answer() -> None:
    assert encode_context(KAT_CONTEXT) == CONTEXT_KAT


def test_seal_matches_known_answer_vector() -> None:
    blob = seal(_kat_key(), PAN, KAT_CONTEXT, nonce_source_for_tests=fixed_nonce())
    assert blob == ENVELOPE_KAT


def test_known_answer_vector_matches_layout_built_by_hand() -> None:
    header = b"\x01" + b"\x03pan" + (1).to_bytes(4, "big")
    body = AESGCM(KAT_KEY).encrypt(KAT_NONCE, PAN, header + CONTEXT_KAT)
    assert header + KAT_NONCE + body == ENVELOPE_KAT


def test_open_reads_known_answer_vector() -> None:
    assert open_(_kat_key(), ENVELOPE_KAT, KAT_CONTEXT) == PAN


def test_read_envelope_header_names_key_and_version() -> None:
    header = read_envelope_header(ENVELOPE_KAT)
    assert (header.format_version, header.key_name, header.key_version) == (1, "pan", 1)


# --- round trip and randomness ---------------------------------------------------------


@settings(max_examples=100)
@given(plaintext=st.binary(max_size=300), context=contexts)
def test_open_returns_what_seal_sealed(plaintext: bytes, context: dict[str, str]) -> None:
    key = Key("pan", 7, KAT_KEY)
    assert open_(key, seal(key, plaintext, context), context) == plaintext


def test_seal_twice_gives_different_ciphertexts(key: Key) -> None:
    blobs = {seal(key, PAN, KAT_CONTEXT) for _ in range(20)}
    assert len(blobs) == 20
    nonces = {blob[9:21] for blob in blobs}
    assert len(nonces) == 20


def test_open_accepts_context_in_any_insertion_order(key: Key) -> None:
    blob = seal(key, PAN, KAT_CONTEXT)
    assert open_(key, blob, dict(reversed(list(KAT_CONTEXT.items())))) == PAN


def test_seal_accepts_bytearray_plaintext(key: Key) -> None:
    assert open_(key, seal(key, bytearray(PAN), KAT_CONTEXT), KAT_CONTEXT) == PAN


# --- tampering ------------------------------------------------------------------------


@settings(max_examples=200)
@given(data=st.data())
def test_open_rejects_any_single_flipped_bit(data: st.DataObject) -> None:
    key = _kat_key()
    bit = data.draw(st.integers(min_value=0, max_value=len(ENVELOPE_KAT) * 8 - 1))
    with pytest.raises(InvalidCiphertext):
        open_(key, flip_bit(ENVELOPE_KAT, bit), KAT_CONTEXT)


def test_open_rejects_every_single_flipped_bit_of_known_answer_vector() -> None:
    key = _kat_key()
    for bit in range(len(ENVELOPE_KAT) * 8):
        with pytest.raises(InvalidCiphertext):
            open_(key, flip_bit(ENVELOPE_KAT, bit), KAT_CONTEXT)


@given(length=st.integers(min_value=0, max_value=len(ENVELOPE_KAT) - 1))
def test_open_rejects_any_truncation(length: int) -> None:
    with pytest.raises(InvalidCiphertext):
        open_(_kat_key(), ENVELOPE_KAT[:length], KAT_CONTEXT)


@given(extra=st.binary(min_size=1, max_size=32))
def test_open_rejects_appended_bytes(extra: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        open_(_kat_key(), ENVELOPE_KAT + extra, KAT_CONTEXT)


@pytest.mark.parametrize("first_byte", [0x00, 0x02, 0x80, 0xFF])
def test_open_rejects_unknown_format_version(first_byte: int) -> None:
    with pytest.raises(InvalidCiphertext):
        open_(_kat_key(), bytes([first_byte]) + ENVELOPE_KAT[1:], KAT_CONTEXT)


# --- context binding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"object": "pm_124"},
        {"field": "cvc"},
        {"mode": "live"},
        {"account": "acct_2"},
        {"extra": ""},
    ],
)
def test_open_rejects_ciphertext_moved_to_another_record(key: Key, change: dict[str, str]) -> None:
    blob = seal(key, PAN, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        open_(key, blob, {**KAT_CONTEXT, **change})


def test_open_rejects_context_with_a_field_removed(key: Key) -> None:
    blob = seal(key, PAN, KAT_CONTEXT)
    smaller = {k: v for k, v in KAT_CONTEXT.items() if k != "field"}
    with pytest.raises(InvalidCiphertext):
        open_(key, blob, smaller)


@given(first=contexts, second=contexts)
def test_open_rejects_any_other_context(first: dict[str, str], second: dict[str, str]) -> None:
    assume(first != second)
    key = _kat_key()
    with pytest.raises(InvalidCiphertext):
        open_(key, seal(key, PAN, first), second)


def test_encode_context_keeps_shifted_boundaries_apart() -> None:
    pairs = [
        ({"a": "bc"}, {"ab": "c"}),
        ({"a": "b", "c": "d"}, {"a": "b\x00\x00\x00\x01cd"}),
        ({"a": ""}, {"a": "\x00"}),
    ]
    for one, other in pairs:
        assert encode_context(one) != encode_context(other)


def test_encode_context_refuses_empty_or_non_string_contexts() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_context({})
    with pytest.raises(ValueError, match="empty"):
        encode_context({"": "x"})
    with pytest.raises(TypeError):
        encode_context({"object": 123})  # type: ignore[dict-item]
    with pytest.raises(UnicodeEncodeError):
        encode_context({"object": "\ud800"})


def test_seal_refuses_an_empty_context(key: Key) -> None:
    with pytest.raises(ValueError, match="at least one"):
        seal(key, PAN, {})


# --- keys and header binding -------------------------------------------------------------


def test_open_rejects_another_key_with_the_same_name_and_version() -> None:
    blob = seal(_kat_key(), PAN, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        open_(Key.generate("pan", 1), blob, KAT_CONTEXT)


def test_open_rejects_same_material_under_another_version_or_name() -> None:
    blob = seal(_kat_key(), PAN, KAT_CONTEXT)
    for other in (Key("pan", 2, KAT_KEY), Key("pam", 1, KAT_KEY)):
        with pytest.raises(InvalidCiphertext):
            open_(other, blob, KAT_CONTEXT)


def test_open_rejects_header_rewritten_to_match_another_key_with_same_material() -> None:
    # The associated data covers the header, not only the lookup: even with the name or
    # version rewritten to match a key holding the same material, the tag fails.
    blob = seal(_kat_key(), PAN, KAT_CONTEXT)
    relabelled_version = blob[:5] + (2).to_bytes(4, "big") + blob[9:]
    with pytest.raises(InvalidCiphertext):
        open_(Key("pan", 2, KAT_KEY), relabelled_version, KAT_CONTEXT)
    relabelled_name = blob[:2] + b"pam" + blob[5:]
    with pytest.raises(InvalidCiphertext):
        open_(Key("pam", 1, KAT_KEY), relabelled_name, KAT_CONTEXT)


def test_seal_refuses_a_wiped_key() -> None:
    key = Key.generate("pan")
    key.wipe()
    with pytest.raises(ValueError, match="wiped"):
        seal(key, PAN, KAT_CONTEXT)
    with pytest.raises(ValueError, match="wiped"):
        open_(key, ENVELOPE_KAT, KAT_CONTEXT)


def test_seal_refuses_a_nonce_source_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        seal(_kat_key(), PAN, KAT_CONTEXT, nonce_source_for_tests=lambda n: bytes(n + 1))


# --- one opaque error ---------------------------------------------------------------------


def test_every_open_failure_raises_the_same_opaque_error() -> None:
    key = _kat_key()
    failures: list[Callable[[], object]] = [
        lambda: open_(key, b"", KAT_CONTEXT),
        lambda: open_(key, ENVELOPE_KAT[:-1], KAT_CONTEXT),
        lambda: open_(key, flip_bit(ENVELOPE_KAT, 200), KAT_CONTEXT),
        lambda: open_(key, b"\x09" + ENVELOPE_KAT[1:], KAT_CONTEXT),
        lambda: open_(Key.generate("pan", 1), ENVELOPE_KAT, KAT_CONTEXT),
        lambda: open_(Key("pan", 2, KAT_KEY), ENVELOPE_KAT, KAT_CONTEXT),
        lambda: open_(key, ENVELOPE_KAT, {**KAT_CONTEXT, "mode": "live"}),
        lambda: open_(key, b"\x01\x00", KAT_CONTEXT),
        lambda: open_(key, b"\x01\x03p\xffn\x00\x00\x00\x01" + bytes(28), KAT_CONTEXT),
    ]
    messages = set()
    for failure in failures:
        with pytest.raises(InvalidCiphertext) as info:
            failure()
        assert type(info.value) is InvalidCiphertext
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__
        messages.add(str(info.value))
    assert messages == {"The ciphertext could not be opened."}


def test_read_envelope_header_rejects_malformed_input() -> None:
    for blob in (b"", b"\x01", b"\x01\x00" + bytes(40), b"\x02" + ENVELOPE_KAT[1:]):
        with pytest.raises(InvalidCiphertext):
            read_envelope_header(blob)
