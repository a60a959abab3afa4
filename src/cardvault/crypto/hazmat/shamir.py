"""Shamir's secret sharing over GF(2^8), byte by byte. Hazardous: see the package docstring.

Each byte of the secret is the constant term of its own random polynomial of degree
``threshold - 1`` over GF(2^8) (the AES field, reduction polynomial
x^8 + x^4 + x^3 + x + 1, 0x11B). Share ``x`` (1..255) holds every polynomial evaluated at
``x``. Any ``threshold`` shares give the constant terms back by Lagrange interpolation at
zero; fewer give no information about them. This is the construction of HashiCorp
Vault's ``shamir`` package, with share x-coordinates 1..n instead of random ones.

What this module does not do: check that a share is well formed, that shares come from
the same split, that there are enough of them, or that the result is right. With fewer
than ``threshold`` shares, or a corrupted one, :func:`shamir_combine` silently returns a
wrong secret. :mod:`cardvault.crypto.shamir` adds a share encoding with a checksum and a
threshold, and the key check value tells a right root key from a wrong one.

Field arithmetic runs a fixed number of rounds with masks instead of log/exp tables,
because a table lookup indexed by a secret byte leaks that byte through the CPU cache.
CPython's integers make no constant-time promise either, so this is a mitigation, not a
guarantee; the secrets split here (root keys) are combined rarely, on the key service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["gf256_div", "gf256_inv", "gf256_mul", "shamir_combine", "shamir_split"]

# The AES reduction polynomial x^8 + x^4 + x^3 + x + 1.
_REDUCTION = 0x11B
MAX_SHARES = 255  # x-coordinates are the nonzero field elements.


def gf256_mul(a: int, b: int) -> int:
    """Product of two field elements (ints 0..255) in GF(2^8) modulo 0x11B."""
    product = 0
    for _ in range(8):
        product ^= -(b & 1) & a
        carry = a >> 7
        a = ((a << 1) ^ (-carry & _REDUCTION)) & 0xFF
        b >>= 1
    return product


def gf256_inv(a: int) -> int:
    """Multiplicative inverse, as a^254 (a^255 = 1 for a != 0). Raises for zero."""
    if a == 0:
        raise ZeroDivisionError("zero has no inverse in GF(2^8)")
    # Square-and-multiply over the public exponent 254 = 0b11111110.
    result = 1
    for bit in (1, 1, 1, 1, 1, 1, 1, 0):
        result = gf256_mul(result, result)
        if bit:
            result = gf256_mul(result, a)
    return result


def gf256_div(a: int, b: int) -> int:
    """Quotient a / b in GF(2^8). Raises ZeroDivisionError when b is zero."""
    return gf256_mul(a, gf256_inv(b))


def shamir_split(
    secret: bytes | bytearray,
    shares: int,
    threshold: int,
    random_bytes: Callable[[int], bytes],
) -> list[tuple[int, bytearray]]:
    """Split ``secret`` into ``shares`` points ``(x, y)`` with ``x`` = 1..shares.

    ``random_bytes(n)`` must return ``n`` uniformly random bytes; it is called once, for
    ``len(secret) * (threshold - 1)`` bytes. Coefficient ``j`` (1..threshold-1) of the
    polynomial for secret byte ``i`` is byte ``i * (threshold - 1) + (j - 1)`` of it.
    That order is fixed so that known-answer tests can replay it.
    """
    if not 2 <= threshold <= shares <= MAX_SHARES:
        raise ValueError("need 2 <= threshold <= shares <= 255")
    if not secret:
        raise ValueError("cannot split an empty secret")
    degree = threshold - 1
    coefficients = bytearray(random_bytes(len(secret) * degree))
    if len(coefficients) != len(secret) * degree:
        raise ValueError("random_bytes returned the wrong number of bytes")
    try:
        points: list[tuple[int, bytearray]] = []
        for x in range(1, shares + 1):
            y = bytearray(len(secret))
            for i, constant in enumerate(secret):
                # Horner's rule from the highest coefficient down to the secret byte.
                acc = 0
                for j in range(degree, 0, -1):
                    acc = gf256_mul(acc, x) ^ coefficients[i * degree + (j - 1)]
                y[i] = gf256_mul(acc, x) ^ constant
            points.append((x, y))
        return points
    finally:
        coefficients[:] = bytes(len(coefficients))


def shamir_combine(points: Sequence[tuple[int, bytes | bytearray]]) -> bytearray:
    """Interpolate the points at x = 0 and return the secret they define.

    Raises ValueError for fewer than two points, an x outside 1..255, a repeated x, or
    points of different lengths. Says nothing about whether the result is right.
    """
    if len(points) < 2:
        raise ValueError("need at least two shares")
    xs = [x for x, _ in points]
    if any(not 1 <= x <= MAX_SHARES for x in xs):
        raise ValueError("share x-coordinates must be 1..255")
    if len(set(xs)) != len(xs):
        raise ValueError("share x-coordinates must be distinct")
    length = len(points[0][1])
    if length == 0 or any(len(y) != length for _, y in points):
        raise ValueError("shares must all have the same, nonzero length")

    # Lagrange basis at zero: l_i(0) = prod_{j != i} x_j / (x_j - x_i); minus is XOR here.
    # The x-coordinates are public, so this part needs no care about timing.
    basis: list[int] = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = gf256_mul(numerator, xj)
                denominator = gf256_mul(denominator, xj ^ xi)
        basis.append(gf256_div(numerator, denominator))

    secret = bytearray(length)
    for (_, y), li in zip(points, basis, strict=True):
        for k in range(length):
            secret[k] ^= gf256_mul(y[k], li)
    return secret
