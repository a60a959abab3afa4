"""Ed25519 signatures: known answers, one opaque error, keys that never print.

Known answers:

* RFC 8032 ("Edwards-Curve Digital Signature Algorithm (EdDSA)"), section 7.1, "Test
  Vectors for Ed25519": TEST 1 (empty message), TEST 2 (one byte) and TEST 3 (two bytes),
  copied from https://www.rfc-editor.org/rfc/rfc8032#section-7.1;
* ``asymmetric/Ed25519/sign.input`` from ``cryptography_vectors`` (the 1,024 vectors of
  the ed25519 reference implementation's ``sign.input``, as published by D. J. Bernstein
  et al. with the SUPERCOP ref10 code), which ``cryptography``'s own tests use.

Each line of ``sign.input`` is ``secret‖public:public:message:signature‖message:``, in hex.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import cryptography_vectors
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cardvault import crypto
from cardvault.crypto import (
    SIGNATURE_SIZE,
    CryptoError,
    InvalidSignature,
    SigningKey,
    VerifyKey,
    sign,
    verify,
)

from ._support import flip_bit

# RFC 8032, section 7.1: (secret key, public key, message, signature), hex.
RFC8032_VECTORS = [
    (  # TEST 1
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (  # TEST 2
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (  # TEST 3
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


def sign_input() -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
    path = "asymmetric/Ed25519/sign.input"
    with cryptography_vectors.open_vector_file(path, "r") as handle:
        for line in handle:
            secret_public, public, message, signed, _ = line.strip().split(":")
            signature = bytes.fromhex(signed)[:SIGNATURE_SIZE]
            yield (
                bytes.fromhex(secret_public)[:32],
                bytes.fromhex(public),
                bytes.fromhex(message),
                signature,
            )


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032_VECTORS)
def test_rfc8032_known_answers(seed: str, public: str, message: str, signature: str) -> None:
    key = SigningKey.from_seed(bytes.fromhex(seed))
    assert key.public_key.raw == bytes.fromhex(public)
    assert sign(key, bytes.fromhex(message)) == bytes.fromhex(signature)
    public_key = VerifyKey.from_raw(bytes.fromhex(public))
    verify(public_key, bytes.fromhex(message), bytes.fromhex(signature))


def test_every_reference_vector_signs_and_verifies() -> None:
    count = 0
    for seed, public, message, signature in sign_input():
        key = SigningKey.from_seed(seed)
        assert key.public_key.raw == public
        assert sign(key, message) == signature
        verify(key.public_key, message, signature)
        count += 1
    assert count == 1024


def test_a_signature_verifies_with_cryptography_and_the_other_way_round() -> None:
    # An independent check of the wrapping: the library underneath, called directly.
    key = SigningKey.generate()
    their = serialization.load_pem_private_key(key.expose_private_pem(), None)
    assert isinstance(their, Ed25519PrivateKey)
    message = b"cardvault audit checkpoint v1\x00" + bytes(40)
    their.public_key().verify(sign(key, message), message)
    verify(key.public_key, message, their.sign(message))


def test_sign_is_deterministic() -> None:
    key = SigningKey.generate()
    assert sign(key, b"m") == sign(key, b"m")
    assert len(sign(key, b"m")) == SIGNATURE_SIZE


BAD_SIGNATURES = {
    "another message": lambda s: (b"other", s),
    "a flipped bit": lambda s: (b"message", flip_bit(s, 77)),
    "a flipped bit in S": lambda s: (b"message", flip_bit(s, 300)),
    "truncated": lambda s: (b"message", s[:-1]),
    "extended": lambda s: (b"message", s + b"\x00"),
    "empty": lambda s: (b"message", b""),
    "all zeros": lambda s: (b"message", bytes(SIGNATURE_SIZE)),
    "not bytes": lambda s: (b"message", s.hex()),
}


@pytest.mark.parametrize("case", sorted(BAD_SIGNATURES))
def test_every_bad_signature_raises_the_one_opaque_error(case: str) -> None:
    key = SigningKey.generate()
    message, signature = BAD_SIGNATURES[case](sign(key, b"message"))
    with pytest.raises(InvalidSignature) as info:
        verify(key.public_key, message, signature)
    assert str(info.value) == "The signature does not verify."
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert isinstance(info.value, CryptoError)


def test_another_keys_signature_raises_the_same_error() -> None:
    signer, other = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(InvalidSignature, match=r"^The signature does not verify\.$"):
        verify(other.public_key, b"m", sign(signer, b"m"))


def test_the_types_are_checked() -> None:
    key = SigningKey.generate()
    with pytest.raises(TypeError):
        sign(key.public_key, b"m")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify(key, b"m", sign(key, b"m"))  # type: ignore[arg-type]


def test_a_signing_key_never_prints_itself() -> None:
    seed = bytes.fromhex(RFC8032_VECTORS[0][0])
    key = SigningKey.from_seed(seed)
    pem = key.expose_private_pem()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert seed.hex() not in text
        assert repr(seed) not in text
        assert pem.decode() not in text
    assert repr(key) == "SigningKey(ed25519:21fe31dfa154a261)"  # the audit key id's form


def test_a_signing_key_cannot_be_pickled_or_copied() -> None:
    key = SigningKey.generate()
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            attempt(key)


def test_the_private_key_round_trips_as_pkcs8_pem() -> None:
    key = SigningKey.generate()
    pem = key.expose_private_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert isinstance(serialization.load_pem_private_key(pem, None), Ed25519PrivateKey)
    again = SigningKey.from_pem(pem)
    assert again.public_key == key.public_key
    assert sign(again, b"m") == sign(key, b"m")


def test_the_public_key_round_trips_as_subject_public_key_info_pem() -> None:
    public = SigningKey.generate().public_key
    pem = public.pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert VerifyKey.from_pem(pem) == public
    assert VerifyKey.from_raw(public.raw) == public
    assert hash(VerifyKey.from_raw(public.raw)) == hash(public)
    assert public != SigningKey.generate().public_key
    assert public.raw.hex() in repr(public)  # public: nothing to hide


def test_reading_other_keys_is_refused_with_a_message_that_quotes_nothing() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(ValueError, match=r"^not an Ed25519 private key$"):
        SigningKey.from_pem(ec_pem)
    for pem in (encrypted, b"", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(ValueError, match=r"^not a readable, unencrypted PEM private key$"):
            SigningKey.from_pem(pem)
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match=r"^not an Ed25519 public key$"):
        VerifyKey.from_pem(ec_public)
    with pytest.raises(ValueError, match=r"^not a readable PEM public key$"):
        VerifyKey.from_pem(b"garbage")
    for size in (0, 31, 33):
        with pytest.raises(ValueError):
            VerifyKey.from_raw(bytes(size))
        with pytest.raises(ValueError):
            SigningKey.from_seed(bytes(size))


def test_the_safe_layer_exports_signing() -> None:
    assert {"SigningKey", "VerifyKey", "sign", "verify", "InvalidSignature"} <= set(crypto.__all__)
