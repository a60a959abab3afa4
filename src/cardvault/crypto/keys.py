"""Keys: a name, a version and 32 bytes of secret material that never print.

A :class:`Key` is what every safe-layer function takes. Its material sits in a
``bytearray`` so that :meth:`Key.wipe` can zero it when the key is no longer needed.
Wiping is best effort: ``cryptography`` and OpenSSL copy the key into their own
contexts (a key used for AES-GCM keeps one such context until it is wiped, see
``Key._aes_gcm``), and CPython does not zero freed ``bytes``. It still shortens how long
a key lingers in this process's memory and in core dumps.
"""

from __future__ import annotations

import hmac
import secrets
from types import TracebackType
from typing import NoReturn, final

from cardvault.crypto._encoding import check_key_name, check_key_version
from cardvault.crypto.exceptions import KeyCheckMismatch
from cardvault.crypto.hazmat import AesGcmContext, aes_gcm_context, hmac_sha256

__all__ = [
    "KEY_SIZE",
    "Key",
    "generate_key",
    "key_check_value",
    "verify_key_check_value",
]

KEY_SIZE = 32  # AES-256 and HMAC-SHA256 keys alike; one size means one thing to get right.

# The check value is an HMAC of this fixed label. A label that no format ever encrypts
# or MACs keeps the check value from doubling as an oracle for any real operation.
_KCV_LABEL = b"cardvault key check value v1"
# Eight bytes catch a wrong key with certainty for practical purposes (2**-64 chance of
# a false match) and, being a truncated PRF output, say nothing usable about the key.
_KCV_BYTES = 8


def generate_key() -> bytearray:
    """32 bytes from the operating system's CSPRNG, in a bytearray the caller can wipe."""
    # secrets.token_bytes returns immutable bytes; the copy below is the one we keep and
    # can zero. The temporary is released at once but, like all bytes, not zeroed.
    return bytearray(secrets.token_bytes(KEY_SIZE))


@final
class Key:
    """A named, versioned 256-bit key. ``repr`` and ``str`` never show the material.

    ``material`` is taken over, not copied, when it is a ``bytearray``: :meth:`wipe`
    then zeroes that very buffer, so hand a key its own buffer (as ``generate_key()``
    returns) and do not reuse it. ``bytes`` are copied into a new bytearray.

    A wiped key refuses every further use with ``ValueError`` rather than quietly
    encrypting under 32 zero bytes. A key that is dropped without :meth:`wipe` zeroes
    its buffer when the last reference to it goes.
    """

    __slots__ = ("_aead", "_material", "_name", "_version", "_wiped")

    def __init__(self, name: str, version: int, material: bytes | bytearray) -> None:
        check_key_name(name)
        check_key_version(version)
        if not isinstance(material, bytes | bytearray):
            raise TypeError("key material must be bytes or bytearray")
        if len(material) != KEY_SIZE:
            raise ValueError("key material must be 32 bytes")
        self._name = name
        self._version = version
        self._material = material if isinstance(material, bytearray) else bytearray(material)
        self._wiped = False
        self._aead: AesGcmContext | None = None

    @classmethod
    def generate(cls, name: str, version: int = 1) -> Key:
        """A fresh random key."""
        return cls(name, version, generate_key())

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return self._version

    @property
    def wiped(self) -> bool:
        return self._wiped

    def _secret_buffer(self) -> bytearray:
        """The live material, for :mod:`cardvault.crypto`'s own modules only. Raises if
        wiped. Private because whoever holds this buffer can read the key and writing to
        it changes the key; code outside the crypto package uses :meth:`expose_secret`.
        """
        if self._wiped:
            raise ValueError("this key has been wiped")
        return self._material

    def _aes_gcm(self) -> AesGcmContext:
        """The key made ready for AES-256-GCM, built on first use and kept until
        :meth:`wipe` (building it is most of the cost of sealing one card number). For
        :mod:`cardvault.crypto`'s own modules only; raises if wiped."""
        if self._wiped:
            raise ValueError("this key has been wiped")
        if self._aead is None:
            self._aead = aes_gcm_context(self._material)
        return self._aead

    def expose_secret(self) -> bytes:
        """A copy of the material, for the one place it must leave: the key service
        handing a data key to the vault over mTLS. The copy cannot be wiped; keep it
        short-lived. Grep for this name to find every place a key leaves its object.
        """
        return bytes(self._secret_buffer())

    def wipe(self) -> None:
        """Zero the material in place and drop the AES-GCM context built from it (OpenSSL
        clears a cipher context's key when it frees it). Idempotent."""
        self._wiped = True  # first: no use from here on can build a new context
        self._aead = None
        self._material[:] = bytes(len(self._material))

    def __del__(self) -> None:
        # A key that nobody refers to any more (a data key that left the vault's cache,
        # a derived key a caller dropped) is zeroed at once, by reference counting,
        # instead of leaving its material in freed memory. Explicit wipe() stays the
        # rule for keys whose end is known. (No material: __init__ refused its input.)
        if hasattr(self, "_material"):
            self.wipe()

    def __enter__(self) -> Key:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        state = ", wiped" if self._wiped else ""
        return f"Key(name={self._name!r}, version={self._version}{state})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the material to wherever the pickle goes (a cache, a
        # queue, a file); copy.copy would make a second buffer that wipe() misses.
        raise TypeError("Key objects cannot be pickled or copied")


def key_check_value(key: Key) -> str:
    """A short public fingerprint of a key: 16 lowercase hex characters.

    HMAC-SHA256(key, "cardvault key check value v1"), first 8 bytes. Stored beside
    Shamir shares or a sealed root key, it tells the right key from a wrong one (for
    example, a root key rebuilt from the wrong shares) without storing the key.
    """
    return hmac_sha256(key._secret_buffer(), _KCV_LABEL)[:_KCV_BYTES].hex()


def verify_key_check_value(key: Key, expected: str) -> None:
    """Raise :class:`KeyCheckMismatch` unless ``key`` has the check value ``expected``."""
    actual = key_check_value(key).encode("ascii")
    wanted = expected.strip().lower().encode("utf-8")
    if not hmac.compare_digest(actual, wanted):
        raise KeyCheckMismatch
