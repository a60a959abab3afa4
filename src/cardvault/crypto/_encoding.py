"""Byte-level building blocks shared by the formats in ``docs/crypto-formats.md``.

Every variable-length field is length-prefixed, so that no two different inputs encode
to the same bytes; that is what makes associated data unambiguous.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Callable, Mapping

from cardvault.crypto.exceptions import InvalidCiphertext
from cardvault.crypto.hazmat import GCM_NONCE_SIZE

__all__ = [
    "MAX_KEY_VERSION",
    "Context",
    "NonceSource",
    "Reader",
    "as_bytes",
    "check_key_name",
    "check_key_version",
    "draw_nonce",
    "encode_context",
    "lp",
    "u8",
    "u32",
]

Context = Mapping[str, str]
"""What a ciphertext is bound to: field name → value, e.g. ``{"object": "pm_123"}``."""

NonceSource = Callable[[int], bytes]
"""``f(n) -> n bytes``. Only tests pass one, to make known-answer vectors."""

MAX_KEY_VERSION = 2**32 - 1
_MAX_NAME_BYTES = 255


def draw_nonce(nonce_source_for_tests: NonceSource | None) -> bytes:
    """96 random bits, or the test-only source's bytes when one is given.

    With random 96-bit nonces, NIST SP 800-38D allows at most 2**32 encryptions per key;
    the key service bounds the use of each data key far below that (DESIGN.md).
    """
    if nonce_source_for_tests is None:
        return secrets.token_bytes(GCM_NONCE_SIZE)
    nonce = bytes(nonce_source_for_tests(GCM_NONCE_SIZE))
    if len(nonce) != GCM_NONCE_SIZE:
        raise ValueError("the nonce source must return 12 bytes")
    return nonce


def as_bytes(value: bytes | bytearray, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{what} must be bytes")
    return bytes(value)


_U8 = struct.Struct(">B").pack
_U32 = struct.Struct(">I").pack
#: ``u32 len(name) || name`` of context field names already seen.
_FIELD_PREFIXES: dict[str, bytes] = {}
# Printable ASCII without space: what a key name may hold.
_NAME_BYTES = re.compile(rb"[\x21-\x7e]+")


def u8(value: int) -> bytes:
    return _U8(value)


def u32(value: int) -> bytes:
    return _U32(value)


def lp(data: bytes) -> bytes:
    """``data`` prefixed with its length as a 4-byte big-endian integer."""
    return _U32(len(data)) + data


def check_key_name(name: str) -> bytes:
    """Validate a key name and return its ASCII bytes.

    Names are 1..255 bytes of printable ASCII without spaces (0x21..0x7E), so that they
    fit the one-byte length in a header and print unambiguously in logs and errors.
    """
    if not isinstance(name, str):
        raise TypeError("a key name must be a str")
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("a key name must be printable ASCII") from None
    if len(raw) > _MAX_NAME_BYTES or _NAME_BYTES.fullmatch(raw) is None:
        raise ValueError("a key name must be 1..255 printable ASCII characters, no spaces")
    return raw


def check_key_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError("a key version must be an int")
    if not 1 <= version <= MAX_KEY_VERSION:
        raise ValueError("a key version must be 1..2**32-1")
    return version


def encode_context(context: Context) -> bytes:
    """The canonical encoding of a context (see ``docs/crypto-formats.md``).

    ``u32 count``, then for each entry in ascending order of the key's UTF-8 bytes:
    ``u32 len(key) || key || u32 len(value) || value``, all UTF-8. Insertion order does
    not matter; the length prefixes keep ``{"a": "bc"}`` apart from ``{"ab": "c"}``.

    An empty context is refused: a ciphertext bound to nothing can be moved anywhere,
    which is the mistake this encoding exists to prevent.
    """
    if type(context) is not dict and not isinstance(context, Mapping):
        raise TypeError("a context must be a mapping of str to str")
    if not context:
        raise ValueError("a context must name at least one field")
    try:
        # Sorting the str keys sorts their UTF-8 bytes too: UTF-8 keeps code point order.
        keys = sorted(context)
    except TypeError:
        raise TypeError("a context must be a mapping of str to str") from None
    out = [_U32(len(keys))]
    for key in keys:
        value = context[key]
        if type(value) is not str and not isinstance(value, str):
            raise TypeError("a context must be a mapping of str to str")
        # A field name's prefix is made once: services bind ciphertexts to a few names.
        prefix = _FIELD_PREFIXES.get(key)
        if prefix is None:
            if not isinstance(key, str):
                raise TypeError("a context must be a mapping of str to str")
            if not key:
                raise ValueError("context field names must not be empty")
            # "strict" refuses lone surrogates, which have no UTF-8 encoding.
            key_bytes = key.encode("utf-8")
            prefix = _U32(len(key_bytes)) + key_bytes
            if len(_FIELD_PREFIXES) < 256:
                _FIELD_PREFIXES[key] = prefix
        value_bytes = value.encode("utf-8")
        out += (prefix, _U32(len(value_bytes)), value_bytes)
    return b"".join(out)


class Reader:
    """A cursor over untrusted bytes. Every shortfall raises :class:`InvalidCiphertext`."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise InvalidCiphertext from None
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def name(self) -> str:
        """A u8-length-prefixed key name, validated as :func:`check_key_name` would."""
        raw = self.take(self.u8())
        if not raw or any(not 0x21 <= b <= 0x7E for b in raw):
            raise InvalidCiphertext from None
        return raw.decode("ascii")

    def version(self) -> int:
        version = self.u32()
        if version == 0:
            raise InvalidCiphertext from None
        return version

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk
