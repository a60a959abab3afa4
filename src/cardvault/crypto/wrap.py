"""Wrapped data keys: a data key encrypted under a key-encrypting key, for one purpose.

Layout (format 0x02; ``docs/crypto-formats.md`` is the reference)::

    0x02 | u8 len(KEK name) | KEK name | u32 KEK version
         | u8 len(key name) | key name | u32 key version
         | nonce (12) | encrypted key (32) | tag (16)

Associated data is the header (everything before the nonce) followed by
``u32 len(purpose) || purpose`` (UTF-8). So a wrapped key names the KEK version that
unwraps it and the data key it holds, and a key wrapped for ``"pan"`` does not unwrap as
``"fingerprint"``: the purpose is not stored, it must be supplied and must match.

AES-GCM rather than AES key wrap (RFC 3394/5649): key wrap has no associated data, so
binding the purpose would take a second mechanism, while GCM binds it in the same
authenticated call. A random nonce is safe here for the same 2**32-per-KEK-version
reason as for envelopes, and KEK versions wrap far fewer keys than that.
"""

from __future__ import annotations

from dataclasses import dataclass

from cardvault.crypto._encoding import (
    NonceSource,
    Reader,
    as_bytes,
    check_key_name,
    check_key_version,
    draw_nonce,
    lp,
    u8,
    u32,
)
from cardvault.crypto.exceptions import InvalidCiphertext
from cardvault.crypto.hazmat import (
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
    InvalidTag,
    aes_gcm_decrypt_into,
    aes_gcm_encrypt,
)
from cardvault.crypto.keys import KEY_SIZE, Key

__all__ = [
    "WRAPPED_KEY_FORMAT_V1",
    "WrappedKeyHeader",
    "read_wrapped_key_header",
    "unwrap_key",
    "wrap_key",
]

WRAPPED_KEY_FORMAT_V1 = 0x02


@dataclass(frozen=True, slots=True)
class WrappedKeyHeader:
    """The public part of a wrapped key. Unauthenticated until the key is unwrapped."""

    format_version: int
    kek_name: str
    kek_version: int
    key_name: str
    key_version: int


def _purpose_bytes(purpose: str) -> bytes:
    if not isinstance(purpose, str):
        raise TypeError("a purpose must be a str")
    if not purpose:
        raise ValueError("a purpose must not be empty")
    return lp(purpose.encode("utf-8"))


def _header(kek: Key, key_name: str, key_version: int) -> bytes:
    kek_name = check_key_name(kek.name)
    name = check_key_name(key_name)
    return (
        u8(WRAPPED_KEY_FORMAT_V1)
        + u8(len(kek_name))
        + kek_name
        + u32(check_key_version(kek.version))
        + u8(len(name))
        + name
        + u32(check_key_version(key_version))
    )


def _parse(wrapped: bytes) -> tuple[WrappedKeyHeader, bytes, bytes, bytes]:
    reader = Reader(wrapped)
    if reader.u8() != WRAPPED_KEY_FORMAT_V1:
        raise InvalidCiphertext from None
    kek_name = reader.name()
    kek_version = reader.version()
    key_name = reader.name()
    key_version = reader.version()
    header_bytes = wrapped[: reader.position]
    nonce = reader.take(GCM_NONCE_SIZE)
    body = reader.rest()
    if len(body) != KEY_SIZE + GCM_TAG_SIZE:
        raise InvalidCiphertext from None
    header = WrappedKeyHeader(WRAPPED_KEY_FORMAT_V1, kek_name, kek_version, key_name, key_version)
    return header, header_bytes, nonce, body


def read_wrapped_key_header(wrapped: bytes | bytearray) -> WrappedKeyHeader:
    """Which KEK version a wrapped key needs and which data key it holds, unopened.

    Unauthenticated: use it to pick a KEK version, or to find keys still wrapped under
    an old version. Raises :class:`InvalidCiphertext` if the value is malformed.
    """
    header, _, _, _ = _parse(as_bytes(wrapped, "wrapped key"))
    return header


def wrap_key(
    kek: Key,
    data_key: Key,
    purpose: str,
    *,
    nonce_source_for_tests: NonceSource | None = None,
) -> bytes:
    """Encrypt ``data_key`` (its name, version and material) under ``kek`` for ``purpose``.

    ``nonce_source_for_tests`` exists only for known-answer tests.
    """
    header = _header(kek, data_key.name, data_key.version)
    aad = header + _purpose_bytes(purpose)
    nonce = draw_nonce(nonce_source_for_tests)
    return (
        header
        + nonce
        + aes_gcm_encrypt(kek._secret_buffer(), nonce, data_key._secret_buffer(), aad)
    )


def unwrap_key(kek: Key, wrapped: bytes | bytearray, purpose: str) -> Key:
    """The data key inside ``wrapped``, as a new :class:`Key` the caller should wipe.

    Raises :class:`InvalidCiphertext`, and only that, when ``wrapped`` is malformed,
    altered, made under another KEK or KEK version, or wrapped for another purpose.
    """
    blob = as_bytes(wrapped, "wrapped key")
    purpose_bytes = _purpose_bytes(purpose)
    kek_material = kek._secret_buffer()
    header, header_bytes, nonce, body = _parse(blob)
    if header.kek_name != kek.name or header.kek_version != kek.version:
        raise InvalidCiphertext from None
    try:
        material = aes_gcm_decrypt_into(kek_material, nonce, body, header_bytes + purpose_bytes)
    except InvalidTag:
        raise InvalidCiphertext from None
    return Key(header.key_name, header.key_version, material)
