"""Keyrings: rotation, rewrap, min_decryption_version and destroying retired versions."""

from __future__ import annotations

import pytest

from cardvault.crypto import (
    InvalidCiphertext,
    Key,
    Keyring,
    read_envelope_header,
    read_wrapped_key_header,
    seal,
)

from ._support import KAT_CONTEXT, KAT_KEY

PAN = b"4242424242424242"


def test_seal_uses_the_newest_version_after_rotate() -> None:
    ring = Keyring.generate("pan")
    assert read_envelope_header(ring.seal(PAN, KAT_CONTEXT)).key_version == 1
    new = ring.rotate()
    assert new.version == 2
    assert ring.versions == (1, 2)
    assert read_envelope_header(ring.seal(PAN, KAT_CONTEXT)).key_version == 2


def test_open_picks_the_version_named_in_the_header() -> None:
    ring = Keyring.generate("pan")
    old = ring.seal(PAN, KAT_CONTEXT)
    ring.rotate()
    new = ring.seal(b"5555555555554444", KAT_CONTEXT)
    assert ring.open_(old, KAT_CONTEXT) == PAN
    assert ring.open_(new, KAT_CONTEXT) == b"5555555555554444"


def test_rotate_makes_a_key_with_different_material() -> None:
    ring = Keyring.generate("pan")
    ring.rotate()
    assert ring.key(1).expose_secret() != ring.key(2).expose_secret()


def test_rewrap_moves_ciphertext_to_the_newest_version() -> None:
    ring = Keyring.generate("pan")
    old = ring.seal(PAN, KAT_CONTEXT)
    ring.rotate()
    ring.rotate()
    rewrapped = ring.rewrap(old, KAT_CONTEXT)
    assert read_envelope_header(rewrapped).key_version == 3
    assert rewrapped != old
    assert ring.open_(rewrapped, KAT_CONTEXT) == PAN


def test_rewrap_keeps_the_context_binding() -> None:
    ring = Keyring.generate("pan")
    old = ring.seal(PAN, KAT_CONTEXT)
    ring.rotate()
    rewrapped = ring.rewrap(old, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        ring.open_(rewrapped, {**KAT_CONTEXT, "object": "pm_999"})
    with pytest.raises(InvalidCiphertext):
        ring.rewrap(old, {**KAT_CONTEXT, "object": "pm_999"})


def test_open_refuses_versions_below_min_decryption_version() -> None:
    ring = Keyring.generate("pan")
    old = ring.seal(PAN, KAT_CONTEXT)
    ring.rotate()
    ring.set_min_decryption_version(2)
    with pytest.raises(InvalidCiphertext):
        ring.open_(old, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        ring.rewrap(old, KAT_CONTEXT)
    # Lowering it again restores access while the version is still held.
    ring.set_min_decryption_version(1)
    assert ring.open_(old, KAT_CONTEXT) == PAN


def test_min_decryption_version_cannot_pass_the_newest_version() -> None:
    ring = Keyring.generate("pan")
    with pytest.raises(ValueError, match="newest"):
        ring.set_min_decryption_version(2)
    with pytest.raises(ValueError):
        ring.set_min_decryption_version(0)
    with pytest.raises(ValueError, match="newest"):
        Keyring([Key.generate("pan", 1)], min_decryption_version=2)


def test_destroy_retired_wipes_and_drops_old_versions() -> None:
    ring = Keyring.generate("pan")
    v1 = ring.latest
    old = ring.seal(PAN, KAT_CONTEXT)
    ring.rotate()
    ring.rotate()
    ring.set_min_decryption_version(3)
    assert ring.destroy_retired() == (1, 2)
    assert ring.versions == (3,)
    assert v1.wiped
    ring.set_min_decryption_version(1)
    with pytest.raises(InvalidCiphertext):
        ring.open_(old, KAT_CONTEXT)


def test_open_refuses_unknown_version_and_another_key_name() -> None:
    ring = Keyring([Key("pan", 1, KAT_KEY)])
    from_the_future = seal(Key("pan", 2, KAT_KEY), PAN, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        ring.open_(from_the_future, KAT_CONTEXT)
    other_name = seal(Key("fingerprint", 1, KAT_KEY), PAN, KAT_CONTEXT)
    with pytest.raises(InvalidCiphertext):
        ring.open_(other_name, KAT_CONTEXT)


def test_keyring_refuses_mixed_names_duplicate_versions_and_emptiness() -> None:
    with pytest.raises(ValueError, match="same name"):
        Keyring([Key.generate("pan", 1), Key.generate("fingerprint", 2)])
    with pytest.raises(ValueError, match="same version"):
        Keyring([Key.generate("pan", 1), Key.generate("pan", 1)])
    with pytest.raises(ValueError, match="at least one"):
        Keyring([])


def test_keyring_repr_shows_versions_not_material() -> None:
    ring = Keyring([Key("pan", 1, KAT_KEY), Key("pan", 2, bytes(32))])
    assert repr(ring) == "Keyring(name='pan', versions=[1, 2], min_decryption_version=1)"
    assert KAT_KEY.hex() not in repr(ring)


def test_rewrap_key_moves_wrapped_key_to_newest_kek_version_without_changing_it() -> None:
    ring = Keyring.generate("pan")
    data_key = Key("dk_1", 1, KAT_KEY)
    wrapped = ring.wrap_key(data_key, "pan")
    ring.rotate()
    rewrapped = ring.rewrap_key(wrapped, "pan")
    assert read_wrapped_key_header(rewrapped).kek_version == 2
    ring.set_min_decryption_version(2)
    assert ring.unwrap_key(rewrapped, "pan").expose_secret() == KAT_KEY
    with pytest.raises(InvalidCiphertext):
        ring.unwrap_key(wrapped, "pan")


def test_keyring_unwrap_key_keeps_purpose_binding() -> None:
    ring = Keyring.generate("pan")
    wrapped = ring.wrap_key(Key("dk_1", 1, KAT_KEY), "pan")
    with pytest.raises(InvalidCiphertext):
        ring.unwrap_key(wrapped, "fingerprint")
    with pytest.raises(InvalidCiphertext):
        ring.rewrap_key(wrapped, "fingerprint")


def test_wipe_makes_every_version_unusable() -> None:
    ring = Keyring.generate("pan")
    ring.rotate()
    ring.wipe()
    with pytest.raises(ValueError, match="wiped"):
        ring.seal(PAN, KAT_CONTEXT)
