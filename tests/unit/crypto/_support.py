"""Helpers for the crypto tests: fixed test-only randomness and a CAVP .rsp parser."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cryptography_vectors

# The fixed inputs of every known-answer vector in these tests.
KAT_KEY = bytes(range(32))  # 00 01 02 ... 1f
KAT_KEK = bytes(range(0x20, 0x40))  # 20 21 22 ... 3f
KAT_NONCE = bytes(range(0xA0, 0xAC))  # a0 a1 ... ab
KAT_CONTEXT = {"account": "acct_1", "mode": "test", "object": "pm_123", "field": "number"}


def fixed_nonce(nonce: bytes = KAT_NONCE) -> Callable[[int], bytes]:
    """A test-only nonce source that always returns ``nonce``."""

    def source(n: int) -> bytes:
        assert n == len(nonce)
        return nonce

    return source


def counting_bytes(start: int = 1) -> Callable[[int], bytes]:
    """A test-only random source yielding start, start+1, ... (mod 256), across calls."""
    state = {"next": start}

    def source(n: int) -> bytes:
        out = bytes((state["next"] + i) % 256 for i in range(n))
        state["next"] = (state["next"] + n) % 256
        return out

    return source


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@dataclass(frozen=True)
class GcmVector:
    section: dict[str, str]
    fields: dict[str, str]
    fail: bool

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.fields[name])


def load_cavp_gcm(filename: str) -> Iterator[GcmVector]:
    """Parse a NIST CAVP GCM ``.rsp`` file from ``cryptography_vectors``.

    Bracketed lines (``[IVlen = 96]``) set the section parameters; each ``Count = n``
    starts a vector whose ``Name = hex`` lines follow; a bare ``FAIL`` marks a vector
    that must not decrypt.
    """
    path = os.path.join("ciphers", "AES", "GCM", filename)
    section: dict[str, str] = {}
    # The vector being read, with the section parameters that were in force at its
    # "Count" line (a new section header may come before the next "Count").
    pending: tuple[dict[str, str], dict[str, str]] | None = None
    fail = False
    with cryptography_vectors.open_vector_file(path, "r") as handle:
        lines = [line.strip() for line in handle]
    for line in [*lines, "Count = end"]:
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            name, _, value = line[1:-1].partition("=")
            section = {**section, name.strip(): value.strip()}
            continue
        if line == "FAIL":
            fail = True
            continue
        name, _, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if name == "Count":
            if pending is not None:
                yield GcmVector(pending[0], pending[1], fail)
            pending, fail = (section, {}), False
        elif pending is not None:
            pending[1][name] = value
