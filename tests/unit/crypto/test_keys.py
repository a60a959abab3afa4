"""Keys: secrecy of repr, wiping, validation, and key check values."""

from __future__ import annotations

import copy
import pickle

import pytest

from cardvault.crypto import (
    KEY_SIZE,
    Key,
    KeyCheckMismatch,
    generate_key,
    key_check_value,
    open_,
    seal,
    verify_key_check_value,
)

from ._support import KAT_KEY

# Known answer: HMAC-SHA256(bytes(range(32)), b"cardvault key check value v1")[:8].hex(),
# computed by this module and checked below with the standard library's hmac.
KCV_KAT = "09497d0a838515da"


def test_generate_key_returns_32_fresh_random_bytes_in_a_bytearray() -> None:
    keys = [generate_key() for _ in range(8)]
    assert all(isinstance(k, bytearray) and len(k) == KEY_SIZE for k in keys)
    assert len({bytes(k) for k in keys}) == 8


def test_key_repr_and_str_never_show_material() -> None:
    key = Key("pan", 2, KAT_KEY)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert KAT_KEY.hex() not in text
        assert repr(KAT_KEY) not in text
        assert "pan" in text
    assert repr(key) == "Key(name='pan', version=2)"


def test_key_wipe_zeroes_the_buffer_it_was_given() -> None:
    buffer = bytearray(KAT_KEY)
    key = Key("pan", 1, buffer)
    key.wipe()
    assert buffer == bytearray(KEY_SIZE)
    assert key.wiped
    assert "wiped" in repr(key)
    with pytest.raises(ValueError, match="wiped"):
        key.expose_secret()


def test_a_dropped_key_zeroes_the_buffer_it_was_given() -> None:
    buffer = bytearray(KAT_KEY)
    key = Key("pan", 1, buffer)
    seal(key, b"secret", {"object": "pm_1"})  # with its AES-GCM context built
    user = key  # a second reference: nothing happens while it lives
    del key
    assert buffer == bytearray(KAT_KEY)
    del user
    assert buffer == bytearray(KEY_SIZE)


def test_a_wiped_key_drops_its_cipher_context_and_seals_and_opens_nothing() -> None:
    key = Key("pan", 1, bytearray(KAT_KEY))
    context = {"account": "acct_1", "object": "pm_1", "field": "number"}
    sealed = seal(key, b"secret", context)
    assert key._aead is not None  # kept after the first use
    assert open_(key, sealed, context) == b"secret"
    key.wipe()
    assert key._aead is None
    with pytest.raises(ValueError, match="wiped"):
        seal(key, b"secret", context)
    with pytest.raises(ValueError, match="wiped"):
        open_(key, sealed, context)
    # The same material in a new key still opens it: nothing was tied to the object.
    assert open_(Key("pan", 1, KAT_KEY), sealed, context) == b"secret"


def test_key_copies_immutable_bytes_and_context_manager_wipes() -> None:
    with Key("pan", 1, KAT_KEY) as key:
        assert key.expose_secret() == KAT_KEY
    assert key.wiped


def test_key_refuses_pickle_and_copy() -> None:
    key = Key("pan", 1, KAT_KEY)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)


@pytest.mark.parametrize(
    ("name", "version", "material", "error"),
    [
        ("", 1, KAT_KEY, ValueError),
        ("has space", 1, KAT_KEY, ValueError),
        ("pän", 1, KAT_KEY, ValueError),
        ("x" * 256, 1, KAT_KEY, ValueError),
        ("pan", 0, KAT_KEY, ValueError),
        ("pan", 2**32, KAT_KEY, ValueError),
        ("pan", True, KAT_KEY, TypeError),
        ("pan", 1, KAT_KEY[:16], ValueError),
        ("pan", 1, "not bytes", TypeError),
    ],
)
def test_key_refuses_invalid_fields(
    name: str, version: int, material: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        Key(name, version, material)


def test_key_check_value_matches_known_answer() -> None:
    import hashlib
    import hmac

    key = Key("root", 1, KAT_KEY)
    assert key_check_value(key) == KCV_KAT
    expected = hmac.new(KAT_KEY, b"cardvault key check value v1", hashlib.sha256).digest()[:8]
    assert expected.hex() == KCV_KAT


def test_key_check_value_ignores_name_and_version() -> None:
    assert key_check_value(Key("other", 9, KAT_KEY)) == KCV_KAT


def test_verify_key_check_value_raises_for_a_wrong_key() -> None:
    verify_key_check_value(Key("root", 1, KAT_KEY), KCV_KAT)
    verify_key_check_value(Key("root", 1, KAT_KEY), f"  {KCV_KAT.upper()}\n")
    with pytest.raises(KeyCheckMismatch):
        verify_key_check_value(Key.generate("root"), KCV_KAT)
    with pytest.raises(KeyCheckMismatch):
        verify_key_check_value(Key("root", 1, KAT_KEY), KCV_KAT[:-1])
    with pytest.raises(KeyCheckMismatch):
        verify_key_check_value(Key("root", 1, KAT_KEY), "")
