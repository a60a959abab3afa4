"""A keyring: every version of one named key, so that rotation is an API call.

``seal`` and ``wrap_key`` use the newest version; ``open_`` and ``unwrap_key`` use the
version the header names; versions below ``min_decryption_version`` are retired and
refuse to open anything; ``rotate`` adds a version; ``rewrap`` and ``rewrap_key`` move a
stored value to the newest version (as ``MultiFernet.rotate`` and Vault's transit
``rewrap``). Retired versions can then be destroyed with ``destroy_retired``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from cardvault.crypto._encoding import Context, NonceSource, check_key_version
from cardvault.crypto.envelope import open_, read_envelope_header, seal
from cardvault.crypto.exceptions import InvalidCiphertext
from cardvault.crypto.keys import Key
from cardvault.crypto.wrap import read_wrapped_key_header, unwrap_key, wrap_key

__all__ = ["Keyring"]


class Keyring:
    """The versions of one named key. ``repr`` shows name and versions, never material.

    Reads are safe from several threads; mutations (``rotate``,
    ``set_min_decryption_version``, ``destroy_retired``) take a lock and replace the
    version table whole, so a concurrent reader sees either the old or the new table.
    """

    __slots__ = ("_keys", "_lock", "_min_decryption_version", "_name")

    def __init__(self, keys: Iterable[Key], *, min_decryption_version: int = 1) -> None:
        table: dict[int, Key] = {}
        for key in keys:
            if key.version in table:
                raise ValueError("a keyring cannot hold two keys with the same version")
            table[key.version] = key
        if not table:
            raise ValueError("a keyring needs at least one key")
        names = {key.name for key in table.values()}
        if len(names) != 1:
            raise ValueError("every key in a keyring must have the same name")
        self._name = names.pop()
        self._keys: Mapping[int, Key] = table
        self._lock = threading.Lock()
        self._min_decryption_version = 1
        self.set_min_decryption_version(min_decryption_version)

    @classmethod
    def generate(cls, name: str) -> Keyring:
        """A new keyring holding one fresh random key, version 1."""
        return cls([Key.generate(name, 1)])

    # --- inspection ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version held, ascending, retired ones included until destroyed."""
        return tuple(sorted(self._keys))

    @property
    def latest(self) -> Key:
        """The newest version: the one that seals and wraps."""
        return self._keys[max(self._keys)]

    @property
    def min_decryption_version(self) -> int:
        return self._min_decryption_version

    def key(self, version: int) -> Key:
        """The key of one version, retired or not. Raises KeyError if not held."""
        return self._keys[version]

    def _decryption_key(self, name: str, version: int) -> Key:
        key = self._keys.get(version)
        if name != self._name or key is None or version < self._min_decryption_version:
            raise InvalidCiphertext from None
        return key

    def __repr__(self) -> str:
        return (
            f"Keyring(name={self._name!r}, versions={list(self.versions)}, "
            f"min_decryption_version={self._min_decryption_version})"
        )

    # --- rotation -----------------------------------------------------------------

    def rotate(self) -> Key:
        """Add a fresh random version one above the newest, and return it."""
        with self._lock:
            new = Key.generate(self._name, check_key_version(max(self._keys) + 1))
            self._keys = {**self._keys, new.version: new}
            return new

    def set_min_decryption_version(self, version: int) -> None:
        """Retire every version below ``version``: they no longer open anything.

        ``version`` must be between 1 and the newest version, so that the newest key
        can always open what it seals. Lowering it again works only for versions not
        yet destroyed.
        """
        check_key_version(version)
        with self._lock:
            if version > max(self._keys):
                raise ValueError("min_decryption_version cannot exceed the newest version")
            self._min_decryption_version = version

    def destroy_retired(self) -> tuple[int, ...]:
        """Wipe and drop every version below ``min_decryption_version``.

        Returns the versions destroyed. Whatever they sealed is unreadable from now on,
        so ``rewrap`` everything first.
        """
        with self._lock:
            minimum = self._min_decryption_version
            doomed = [key for version, key in self._keys.items() if version < minimum]
            self._keys = {v: k for v, k in self._keys.items() if v >= minimum}
        # Wiped after the swap: a reader that took a key from the old table a moment ago
        # gets ValueError from the wiped key, never a decryption under zeros.
        for key in doomed:
            key.wipe()
        return tuple(sorted(key.version for key in doomed))

    def wipe(self) -> None:
        """Wipe every version. The keyring is unusable afterwards."""
        for key in self._keys.values():
            key.wipe()

    # --- envelopes ----------------------------------------------------------------

    def seal(
        self,
        plaintext: bytes | bytearray,
        context: Context,
        *,
        nonce_source_for_tests: NonceSource | None = None,
    ) -> bytes:
        """:func:`cardvault.crypto.seal` under the newest version."""
        return seal(self.latest, plaintext, context, nonce_source_for_tests=nonce_source_for_tests)

    def open_(self, ciphertext: bytes | bytearray, context: Context) -> bytes:
        """:func:`cardvault.crypto.open_` under the version the envelope names.

        Raises :class:`InvalidCiphertext` also when that version is unknown, retired or
        destroyed, or the envelope names another key.
        """
        header = read_envelope_header(ciphertext)
        key = self._decryption_key(header.key_name, header.key_version)
        return open_(key, ciphertext, context)

    def rewrap(self, ciphertext: bytes | bytearray, context: Context) -> bytes:
        """Open ``ciphertext`` and seal its plaintext again under the newest version.

        The plaintext never leaves this call. Raises :class:`InvalidCiphertext` as
        :meth:`open_` does, so a retired version cannot be rewrapped.
        """
        return self.seal(self.open_(ciphertext, context), context)

    # --- wrapped keys -------------------------------------------------------------

    def wrap_key(
        self,
        data_key: Key,
        purpose: str,
        *,
        nonce_source_for_tests: NonceSource | None = None,
    ) -> bytes:
        """:func:`cardvault.crypto.wrap_key` under the newest version."""
        return wrap_key(
            self.latest, data_key, purpose, nonce_source_for_tests=nonce_source_for_tests
        )

    def unwrap_key(self, wrapped: bytes | bytearray, purpose: str) -> Key:
        """:func:`cardvault.crypto.unwrap_key` under the version the wrapped key names."""
        header = read_wrapped_key_header(wrapped)
        kek = self._decryption_key(header.kek_name, header.kek_version)
        return unwrap_key(kek, wrapped, purpose)

    def rewrap_key(self, wrapped: bytes | bytearray, purpose: str) -> bytes:
        """Unwrap and wrap again under the newest version; the data key is unchanged,
        so nothing it sealed needs re-encrypting."""
        with self.unwrap_key(wrapped, purpose) as data_key:
            return self.wrap_key(data_key, purpose)
