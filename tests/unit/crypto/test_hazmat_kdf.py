"""HKDF-SHA256 and HMAC-SHA256 in the hazmat layer against their RFC test vectors."""

from __future__ import annotations

from cardvault.crypto.hazmat import hkdf_sha256_into, hmac_sha256


def test_hkdf_sha256_matches_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256_into(
        bytes([0x0B] * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert isinstance(okm, bytearray)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_sha256_matches_rfc5869_test_case_3_without_salt_or_info() -> None:
    okm = hkdf_sha256_into(bytes([0x0B] * 22), salt=None, info=b"", length=42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_hmac_sha256_matches_rfc4231_test_cases_1_and_2() -> None:
    assert hmac_sha256(bytes([0x0B] * 20), b"Hi There").hex() == (
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    )
    assert hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
