"""GF(2^8) arithmetic and raw Shamir splitting: known answers and properties."""

from __future__ import annotations

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.crypto.hazmat import gf256_div, gf256_inv, gf256_mul, shamir_combine, shamir_split

from ._support import counting_bytes


def _reference_mul(a: int, b: int) -> int:
    """Carry-less multiply, then reduce modulo 0x11B: a second, independent algorithm."""
    product = 0
    for bit in range(8):
        if b >> bit & 1:
            product ^= a << bit
    for bit in range(14, 7, -1):
        if product >> bit & 1:
            product ^= 0x11B << (bit - 8)
    return product


def test_gf256_mul_matches_fips197_worked_examples() -> None:
    # FIPS-197 section 4.2: {57} • {83} = {c1}; section 4.2.1: {57} • {13} = {fe}.
    assert gf256_mul(0x57, 0x83) == 0xC1
    assert gf256_mul(0x57, 0x13) == 0xFE
    # HashiCorp Vault's shamir tests: 3 • 7 = 9.
    assert gf256_mul(3, 7) == 9


def test_gf256_inv_matches_fips197_and_inverts_every_nonzero_element() -> None:
    # FIPS-197 section 4.2: {53} and {ca} are inverses.
    assert gf256_inv(0x53) == 0xCA
    for a in range(1, 256):
        assert gf256_mul(a, gf256_inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        gf256_inv(0)
    with pytest.raises(ZeroDivisionError):
        gf256_div(1, 0)


def test_gf256_mul_agrees_with_reference_on_every_pair() -> None:
    for a in range(256):
        for b in range(256):
            assert gf256_mul(a, b) == _reference_mul(a, b)


def test_shamir_split_threshold_2_known_answer() -> None:
    # f(x) = 0x01 + 0x02·x, computed by hand: f(1)=03, f(2)=01^04=05, f(3)=01^06=07.
    points = shamir_split(b"\x01", 3, 2, counting_bytes(2))
    assert points == [(1, bytearray(b"\x03")), (2, bytearray(b"\x05")), (3, bytearray(b"\x07"))]


def test_shamir_split_threshold_3_known_answer() -> None:
    # f(x) = 0x01 + 0x02·x + 0x03·x², by hand: f(1) = 1^2^3 = 00;
    # f(2) = 1 ^ 2•2 ^ 3•(2•2) = 1^04^0c = 09; f(3) = 1 ^ 2•3 ^ 3•(3•3) = 1^06^0f = 08.
    points = shamir_split(b"\x01", 3, 3, counting_bytes(2))
    assert points == [(1, bytearray(b"\x00")), (2, bytearray(b"\x09")), (3, bytearray(b"\x08"))]
    assert shamir_combine([(3, b"\x08"), (1, b"\x00"), (2, b"\x09")]) == bytearray(b"\x01")


def test_shamir_split_uses_random_bytes_in_documented_order() -> None:
    # Two secret bytes, threshold 3: byte 0 takes coefficients (r0, r1), byte 1 (r2, r3).
    # With only the linear coefficient set to 1, f(x) = x for that byte and 0 for the other.
    one = shamir_split(b"\x00\x00", 3, 3, lambda n: bytes([1, 0, 0, 0][:n]))
    assert [bytes(y) for _, y in one] == [b"\x01\x00", b"\x02\x00", b"\x03\x00"]
    two = shamir_split(b"\x00\x00", 3, 3, lambda n: bytes([0, 0, 1, 0][:n]))
    assert [bytes(y) for _, y in two] == [b"\x00\x01", b"\x00\x02", b"\x00\x03"]
    # The quadratic coefficient: f(x) = x² gives 1, 4, 5 (3•3 = 5 in GF(2^8)).
    three = shamir_split(b"\x00", 3, 3, lambda n: bytes([0, 1][:n]))
    assert [bytes(y) for _, y in three] == [b"\x01", b"\x04", b"\x05"]


@settings(max_examples=50, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=48),
    shares=st.integers(min_value=2, max_value=7),
    data=st.data(),
)
def test_any_threshold_points_reconstruct_the_secret(
    secret: bytes, shares: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(min_value=2, max_value=shares))
    points = shamir_split(secret, shares, threshold, secrets.token_bytes)
    for subset in itertools.combinations(points, threshold):
        assert shamir_combine(list(subset)) == secret
    assert shamir_combine(points) == secret


@settings(max_examples=50, deadline=None)
@given(shares=st.integers(min_value=3, max_value=7), data=st.data())
def test_fewer_than_threshold_points_give_a_different_value(
    shares: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(min_value=3, max_value=shares))
    secret = secrets.token_bytes(32)
    points = shamir_split(secret, shares, threshold, secrets.token_bytes)
    for subset in itertools.combinations(points, threshold - 1):
        # Equal by chance with probability 2**-256.
        assert shamir_combine(list(subset)) != secret


def test_shamir_split_refuses_bad_parameters() -> None:
    for shares, threshold in [(3, 1), (2, 3), (256, 2), (0, 0)]:
        with pytest.raises(ValueError, match="threshold"):
            shamir_split(b"k", shares, threshold, secrets.token_bytes)
    with pytest.raises(ValueError, match="empty"):
        shamir_split(b"", 3, 2, secrets.token_bytes)
    with pytest.raises(ValueError, match="wrong number"):
        shamir_split(b"kk", 3, 2, lambda n: b"\x00")


def test_shamir_combine_refuses_malformed_points() -> None:
    with pytest.raises(ValueError, match="two"):
        shamir_combine([(1, b"a")])
    with pytest.raises(ValueError, match="distinct"):
        shamir_combine([(1, b"a"), (1, b"a")])
    with pytest.raises(ValueError, match=r"1\.\.255"):
        shamir_combine([(0, b"a"), (1, b"a")])
    with pytest.raises(ValueError, match="length"):
        shamir_combine([(1, b"a"), (2, b"ab")])
