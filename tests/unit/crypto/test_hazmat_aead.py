"""The hazmat AES-256-GCM layer against NIST CAVP vectors, and its size checks."""

from __future__ import annotations

import copy
import pickle

import pytest

from cardvault.crypto.hazmat import (
    AesGcmContext,
    InvalidTag,
    aes_gcm_context,
    aes_gcm_decrypt,
    aes_gcm_decrypt_into,
    aes_gcm_encrypt,
)

from ._support import GcmVector, load_cavp_gcm


def _applicable(vector: GcmVector) -> bool:
    # The hazmat layer takes only what cardvault uses: 256-bit keys, 96-bit IVs and
    # 128-bit tags. CAVP also has other IV and tag lengths, which it rightly refuses.
    s = vector.section
    return s["Keylen"] == "256" and s["IVlen"] == "96" and s["Taglen"] == "128"


ENCRYPT = [v for v in load_cavp_gcm("gcmEncryptExtIV256.rsp") if _applicable(v)]
DECRYPT = [v for v in load_cavp_gcm("gcmDecrypt256.rsp") if _applicable(v)]


def test_cavp_files_yield_a_meaningful_number_of_vectors() -> None:
    # A parser that silently found nothing would make the tests below vacuous.
    assert len(ENCRYPT) > 100
    assert len(DECRYPT) > 100
    assert sum(v.fail for v in DECRYPT) > 20
    assert sum(not v.fail for v in DECRYPT) > 20
    assert any(v.fields["AAD"] and v.fields["PT"] for v in ENCRYPT)


def test_aes_gcm_encrypt_matches_every_cavp_encrypt_vector() -> None:
    for v in ENCRYPT:
        out = aes_gcm_encrypt(v.hex("Key"), v.hex("IV"), v.hex("PT"), v.hex("AAD"))
        assert out == v.hex("CT") + v.hex("Tag"), v.fields["Key"]


def test_aes_gcm_decrypt_matches_every_cavp_decrypt_vector_including_fail() -> None:
    for v in DECRYPT:
        key, iv, data, aad = v.hex("Key"), v.hex("IV"), v.hex("CT") + v.hex("Tag"), v.hex("AAD")
        if v.fail:
            with pytest.raises(InvalidTag):
                aes_gcm_decrypt(key, iv, data, aad)
            with pytest.raises(InvalidTag):
                aes_gcm_decrypt_into(key, iv, data, aad)
        else:
            assert aes_gcm_decrypt(key, iv, data, aad) == v.hex("PT")
            assert aes_gcm_decrypt_into(key, iv, data, aad) == bytearray(v.hex("PT"))


def test_a_kept_context_gives_every_cavp_answer_that_the_key_itself_gives() -> None:
    # One context per key, used for many operations in both directions, as a Key keeps it.
    contexts: dict[bytes, AesGcmContext] = {}
    for v in ENCRYPT:
        context = contexts.setdefault(v.hex("Key"), aes_gcm_context(v.hex("Key")))
        out = aes_gcm_encrypt(context, v.hex("IV"), v.hex("PT"), v.hex("AAD"))
        assert out == v.hex("CT") + v.hex("Tag")
        back = aes_gcm_decrypt(context, v.hex("IV"), out, v.hex("AAD"))
        assert back == v.hex("PT")
    for v in DECRYPT:
        context = aes_gcm_context(v.hex("Key"))
        data = v.hex("CT") + v.hex("Tag")
        if v.fail:
            with pytest.raises(InvalidTag):
                aes_gcm_decrypt(context, v.hex("IV"), data, v.hex("AAD"))
        else:
            assert aes_gcm_decrypt(context, v.hex("IV"), data, v.hex("AAD")) == v.hex("PT")


def test_aes_gcm_decrypt_rejects_each_cavp_encrypt_vector_with_altered_aad() -> None:
    for v in ENCRYPT[:50]:
        data = v.hex("CT") + v.hex("Tag")
        with pytest.raises(InvalidTag):
            aes_gcm_decrypt(v.hex("Key"), v.hex("IV"), data, v.hex("AAD") + b"\x00")


@pytest.mark.parametrize("key_size", [16, 24, 31, 33])
def test_aes_gcm_refuses_keys_that_are_not_256_bits(key_size: int) -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        aes_gcm_encrypt(bytes(key_size), bytes(12), b"", b"")
    with pytest.raises(ValueError, match="32-byte key"):
        aes_gcm_decrypt(bytes(key_size), bytes(12), bytes(16), b"")
    with pytest.raises(ValueError, match="32-byte key"):
        aes_gcm_context(bytes(key_size))


@pytest.mark.parametrize("nonce_size", [0, 8, 11, 13, 16])
def test_aes_gcm_refuses_nonces_that_are_not_96_bits(nonce_size: int) -> None:
    with pytest.raises(ValueError, match="12-byte nonce"):
        aes_gcm_encrypt(bytes(32), bytes(nonce_size), b"", b"")
    with pytest.raises(ValueError, match="12-byte nonce"):
        aes_gcm_decrypt(bytes(32), bytes(nonce_size), bytes(16), b"")
    context = aes_gcm_context(bytes(32))
    with pytest.raises(ValueError, match="12-byte nonce"):
        aes_gcm_encrypt(context, bytes(nonce_size), b"", b"")
    with pytest.raises(ValueError, match="12-byte nonce"):
        aes_gcm_decrypt(context, bytes(nonce_size), bytes(16), b"")


def test_aes_gcm_decrypt_rejects_input_shorter_than_a_tag() -> None:
    for n in range(16):
        with pytest.raises(InvalidTag):
            aes_gcm_decrypt(bytes(32), bytes(12), bytes(n), b"")


def test_a_context_is_made_only_from_a_256_bit_key_and_never_shows_it() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    # cryptography's own object for a 128-bit key is not a context: the 256-bit rule holds.
    with pytest.raises(TypeError):
        aes_gcm_encrypt(AESGCM(bytes(16)), bytes(12), b"", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aes_gcm_decrypt(AESGCM(bytes(32)), bytes(12), bytes(16), b"")  # type: ignore[arg-type]
    key = bytes(range(32))
    context = aes_gcm_context(key)
    assert key.hex() not in repr(context) and repr(key) not in repr(context)
    with pytest.raises(TypeError):
        pickle.dumps(context)
    with pytest.raises(TypeError):
        copy.copy(context)
