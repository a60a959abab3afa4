"""Wrapped data keys: layout, purpose binding, substitution and tampering."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.crypto import (
    InvalidCiphertext,
    Key,
    read_wrapped_key_header,
    unwrap_key,
    wrap_key,
)

from ._support import KAT_KEK, KAT_KEY, KAT_NONCE, fixed_nonce, flip_bit

# Known-answer vector for wrapped-key format 0x02. Made with
#   wrap_key(Key("pan", 3, bytes(range(0x20, 0x40))), Key("dk_0001", 1, bytes(range(32))),
#            "pan", nonce_source_for_tests=fixed_nonce(bytes(range(0xa0, 0xac))))
# and checked independently below against the documented layout built with AESGCM.
WRAPPED_KAT = bytes.fromhex(
    "02"  # format
    "03" "70616e" "00000003"  # KEK "pan", version 3
    "07" "646b5f30303031" "00000001"  # data key "dk_0001", version 1
    "a0a1a2a3a4a5a6a7a8a9aaab"  # nonce
    "7e3da637c0d286ada921a7b12a5078a9816ed31428a13035178bd1e2cf7bb1e7"  # encrypted key
    "326cb1cdca73f1de44354f98b2ec57eb"  # tag
)  # fmt: skip


def _kek(version: int = 3) -> Key:
    return Key("pan", version, KAT_KEK)


def _data_key() -> Key:
    return Key("dk_0001", 1, KAT_KEY)


def test_wrap_key_matches_known_answer_vector() -> None:
    wrapped = wrap_key(_kek(), _data_key(), "pan", nonce_source_for_tests=fixed_nonce())
    assert wrapped == WRAPPED_KAT


def test_known_answer_vector_matches_layout_built_by_hand() -> None:
    header = b"\x02" + b"\x03pan" + (3).to_bytes(4, "big") + b"\x07dk_0001" + (1).to_bytes(4, "big")
    aad = header + (3).to_bytes(4, "big") + b"pan"
    assert header + KAT_NONCE + AESGCM(KAT_KEK).encrypt(KAT_NONCE, KAT_KEY, aad) == WRAPPED_KAT


def test_unwrap_key_returns_the_data_key_with_its_name_and_version() -> None:
    key = unwrap_key(_kek(), WRAPPED_KAT, "pan")
    assert (key.name, key.version) == ("dk_0001", 1)
    assert key.expose_secret() == KAT_KEY


def test_read_wrapped_key_header_names_kek_and_data_key() -> None:
    header = read_wrapped_key_header(WRAPPED_KAT)
    assert (header.kek_name, header.kek_version) == ("pan", 3)
    assert (header.key_name, header.key_version) == ("dk_0001", 1)


def test_unwrap_key_rejects_key_wrapped_for_another_purpose() -> None:
    wrapped = wrap_key(_kek(), _data_key(), "pan")
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), wrapped, "fingerprint")
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), wrapped, "pan ")
    assert unwrap_key(_kek(), wrapped, "pan").expose_secret() == KAT_KEY


def test_unwrap_key_rejects_another_kek_or_kek_version() -> None:
    with pytest.raises(InvalidCiphertext):
        unwrap_key(Key.generate("pan", 3), WRAPPED_KAT, "pan")
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(version=4), WRAPPED_KAT, "pan")
    with pytest.raises(InvalidCiphertext):
        unwrap_key(Key("fingerprint", 3, KAT_KEK), WRAPPED_KAT, "pan")


def test_unwrap_key_rejects_substituted_data_key_identity() -> None:
    # Renaming the data key in the header (to pass one data key off as another, or to
    # make an old version look current) breaks the tag.
    renamed = WRAPPED_KAT.replace(b"dk_0001", b"dk_0002")
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), renamed, "pan")
    index = WRAPPED_KAT.index(b"dk_0001") + 7
    reversioned = WRAPPED_KAT[:index] + (2).to_bytes(4, "big") + WRAPPED_KAT[index + 4 :]
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), reversioned, "pan")


def test_unwrap_key_rejects_body_spliced_from_another_wrapped_key() -> None:
    other = wrap_key(_kek(), Key("dk_0002", 1, bytes(32)), "pan")
    spliced = WRAPPED_KAT[: -(12 + 48)] + other[-(12 + 48) :]
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), spliced, "pan")


def test_unwrap_key_rejects_envelope_presented_as_wrapped_key() -> None:
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), b"\x01" + WRAPPED_KAT[1:], "pan")


@settings(max_examples=200)
@given(data=st.data())
def test_unwrap_key_rejects_any_single_flipped_bit(data: st.DataObject) -> None:
    bit = data.draw(st.integers(min_value=0, max_value=len(WRAPPED_KAT) * 8 - 1))
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), flip_bit(WRAPPED_KAT, bit), "pan")


@given(length=st.integers(min_value=0, max_value=len(WRAPPED_KAT) - 1))
def test_unwrap_key_rejects_any_truncation(length: int) -> None:
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), WRAPPED_KAT[:length], "pan")


def test_unwrap_key_rejects_appended_bytes() -> None:
    with pytest.raises(InvalidCiphertext):
        unwrap_key(_kek(), WRAPPED_KAT + b"\x00", "pan")


def test_wrap_key_refuses_an_empty_purpose() -> None:
    with pytest.raises(ValueError, match="purpose"):
        wrap_key(_kek(), _data_key(), "")
