"""The root key behind each seal, and the custodian shares that open a Shamir seal.

Every seal gives the key service a :class:`RootKey`: something that seals a KEK (bound
to its name and version) and opens it again, and can be wiped.

* :class:`SoftwareRoot` (the Shamir and development seals): the root key's 32 bytes in
  this process's memory while unsealed, used through :mod:`cardvault.crypto`.
* :class:`TokenRoot` (``[seal] type = "pkcs11"``): the root key is an AES-256 key object
  inside a PKCS#11 token (an HSM; SoftHSM2 in the tests), generated there, sensitive and
  non-extractable. KEKs are sealed and opened by the token's own AES-GCM
  (``CKM_AES_GCM``), the KEK's name and version as associated data; the root key's
  bytes never exist outside the token. The service holds one logged-in session while
  unsealed; sealing closes it.

Shamir seal, two forms (``docs/keys.md``):

* **direct** (what ``cardvault keyservice init`` makes): the shares rebuild the root key.
* **wrapped** (after a custodian re-key or a reseal to Shamir): the shares rebuild an
  *unseal key*, and the seal metadata holds the root key sealed under it
  (``wrapped_root``). A re-key makes a new unseal key, so the old shares rebuild a key
  that opens nothing in the database any more; the root key, and its check value, stay.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinLocked,
    PKCS11Error,
    TokenNotPresent,
)
from pkcs11.mechanisms import GCMParams

from cardvault import crypto
from cardvault.errors import ConfigurationError

__all__ = [
    "ROOT_KEY_NAME",
    "RootKey",
    "SoftwareRoot",
    "TokenConfig",
    "TokenRoot",
    "TokenUnavailable",
    "check_approval",
    "kek_context",
    "root_from_shares",
    "split_approval",
    "split_root",
]

ROOT_KEY_NAME = "root"
UNSEAL_KEY_NAME = "unseal"
#: A KEK sealed by the token: ``0x03 | nonce (12) | ciphertext (32) | tag (16)``, the
#: associated data ``TOKEN_AAD_LABEL || encode_context({"kek", "version"})``.
TOKEN_SEALED_FORMAT = 0x03
TOKEN_AAD_LABEL = b"cardvault token-sealed kek v1"
_NONCE_BYTES = 12
_TAG_BITS = 128
#: What the token seals at creation and opens at every unseal: proof that the key found
#: under the stored id is the one that sealed the KEKs, before any KEK is tried.
_CHECK_CONTEXT = {"check": "root"}
_CHECK_PLAINTEXT = b"cardvault root key check"


def kek_context(name: str, version: int) -> dict[str, str]:
    return {"kek": name, "version": str(version)}


class RootKey(Protocol):
    def seal_kek(self, kek: crypto.Key) -> bytes:
        """``kek``'s material sealed under the root key, bound to its name and version."""

    def open_kek(self, name: str, version: int, sealed: bytes) -> crypto.Key:
        """The KEK inside ``sealed``. Raises :class:`crypto.InvalidCiphertext`."""

    def wipe(self) -> None:
        """Forget the root key (zero it, or close the token session)."""


class SoftwareRoot:
    """The root key in memory (Shamir and development seals)."""

    def __init__(self, key: crypto.Key) -> None:
        self.key = key

    def seal_kek(self, kek: crypto.Key) -> bytes:
        return crypto.seal(self.key, kek.expose_secret(), kek_context(kek.name, kek.version))

    def open_kek(self, name: str, version: int, sealed: bytes) -> crypto.Key:
        material = bytearray(crypto.open_(self.key, sealed, kek_context(name, version)))
        return crypto.Key(name, version, material)

    def wipe(self) -> None:
        self.key.wipe()

    @property
    def wiped(self) -> bool:
        return self.key.wiped


# -- the Shamir seal --------------------------------------------------------------------


def _unseal_context(split_id: str) -> dict[str, str]:
    return {"seal": "shamir", "split": split_id}


def split_root(
    root: crypto.Key, shares: int, threshold: int
) -> tuple[dict[str, Any], list[crypto.Share]]:
    """A wrapped Shamir seal for ``root``: a fresh unseal key, split into ``shares``
    shares (any ``threshold`` rebuild it), and ``root`` sealed under it. Returns the seal
    metadata to store and the shares to hand out once."""
    with crypto.Key.generate(UNSEAL_KEY_NAME, 1) as unseal:
        out = crypto.shamir_split(unseal.expose_secret(), shares, threshold)
        split_id = out[0].split_id.hex()
        wrapped = crypto.seal(unseal, root.expose_secret(), _unseal_context(split_id))
    meta = {
        "type": "shamir",
        "shares": shares,
        "threshold": threshold,
        "split_id": split_id,
        "wrapped_root": base64.b64encode(wrapped).decode("ascii"),
    }
    return meta, out


def root_from_shares(meta: dict[str, Any], material: bytearray) -> crypto.Key:
    """The root key from what K shares rebuilt: the root itself (direct form) or the
    unseal key that opens ``wrapped_root``. Raises :class:`crypto.InvalidShare` when the
    unseal key opens nothing (shares of a re-keyed-away split, or forged)."""
    wrapped = meta.get("wrapped_root")
    if wrapped is None:
        return crypto.Key(ROOT_KEY_NAME, 1, material)
    with crypto.Key(UNSEAL_KEY_NAME, 1, material) as unseal:
        try:
            root = crypto.open_(
                unseal, base64.b64decode(wrapped), _unseal_context(meta["split_id"])
            )
        except crypto.InvalidCiphertext:
            raise crypto.InvalidShare("the shares rebuild the wrong key") from None
    return crypto.Key(ROOT_KEY_NAME, 1, bytearray(root))


# -- custodian approval without root shares (the PKCS#11 seal) ---------------------------

#: The key custodians' approval shares rebuild under a seal whose root key is not split
#: (it never leaves the token): a random key of its own, kept only as its check value.
APPROVAL_KEY_NAME = "approval"
_APPROVAL_CHECK = b"cardvault custodian approval v1"


def _approval_context(split_id: str) -> dict[str, str]:
    return {"seal": "approval", "split": split_id}


def split_approval(shares: int, threshold: int) -> tuple[dict[str, Any], list[crypto.Share]]:
    """Custodian approval shares for a seal without Shamir shares of its root key: a
    fresh random approval key split into ``shares`` (any ``threshold`` rebuild it),
    of which only a check is kept: a constant sealed under it (AES-GCM, so a key that
    merely shares a short check value is no match). Returns the ``approval`` entry of the seal's
    metadata and the shares to hand out once. K of them approve what K unseal shares
    approve under the Shamir seal (a key version's destruction)."""
    with crypto.Key.generate(APPROVAL_KEY_NAME, 1) as key:
        out = crypto.shamir_split(key.expose_secret(), shares, threshold)
        meta = {
            "shares": shares,
            "threshold": threshold,
            "split_id": out[0].split_id.hex(),
            "check": base64.b64encode(
                crypto.seal(key, _APPROVAL_CHECK, _approval_context(out[0].split_id.hex()))
            ).decode("ascii"),
        }
    return meta, out


def check_approval(meta: dict[str, Any], material: bytearray) -> None:
    """Raises :class:`crypto.InvalidShare` unless what K approval shares rebuilt is the
    approval key of ``meta`` (the seal's ``approval`` entry). Wipes ``material``."""
    with crypto.Key(APPROVAL_KEY_NAME, 1, material) as key:
        try:
            check = crypto.open_(
                key, base64.b64decode(meta["check"]), _approval_context(meta["split_id"])
            )
        except crypto.InvalidCiphertext:
            raise crypto.InvalidShare("the shares rebuild the wrong key") from None
    if check != _APPROVAL_CHECK:
        raise crypto.InvalidShare("the shares rebuild the wrong key")


# -- the PKCS#11 seal -------------------------------------------------------------------


class TokenUnavailable(Exception):
    """The token cannot be used now (wrong PIN, token absent, key missing): the key
    service stays sealed and says why."""


@dataclass(frozen=True)
class TokenConfig:
    #: The vendor's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    module: Path
    #: The token's label (``softhsm2-util --init-token --label …``).
    token_label: str
    #: A file holding the user PIN, mode 0600 (or stricter), owned by keyd's user.
    pin_file: Path

    def read_pin(self) -> str:
        try:
            info = self.pin_file.stat()
            pin = self.pin_file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read seal.pkcs11_pin_file: {exc}") from exc
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                "seal.pkcs11_pin_file is readable by other users: chmod 600 it"
            )
        if not pin:
            raise ConfigurationError("seal.pkcs11_pin_file is empty")
        return pin


_LIBS: dict[str, Any] = {}


def _lib(module: Path) -> Any:
    """The PKCS#11 module, loaded (and C_Initialize'd) once per process."""
    key = str(module)
    if key not in _LIBS:
        try:
            _LIBS[key] = pkcs11.lib(key)
        except (PKCS11Error, RuntimeError, OSError) as exc:
            raise ConfigurationError(
                f"cannot load the PKCS#11 module seal.pkcs11_module ({module}): {exc}"
            ) from exc
    return _LIBS[key]


def _open_session(config: TokenConfig) -> Any:
    pin = config.read_pin()
    try:
        token = _lib(config.module).get_token(token_label=config.token_label)
        return token.open(rw=True, user_pin=pin)
    except (NoSuchToken, TokenNotPresent) as exc:
        raise TokenUnavailable(f"no token labelled {config.token_label!r} is present") from exc
    except PinIncorrect as exc:
        raise TokenUnavailable(
            "the token refused the PIN in seal.pkcs11_pin_file (PIN incorrect)"
        ) from exc
    except PinLocked as exc:
        raise TokenUnavailable("the token's user PIN is locked") from exc
    except PKCS11Error as exc:
        raise TokenUnavailable(f"the token failed: {type(exc).__name__}") from exc


class TokenRoot:
    """The root key as a non-extractable AES-256 key object in a PKCS#11 token."""

    def __init__(self, session: Any, key: Any, key_id: bytes) -> None:
        self._session = session
        self._key = key
        self.key_id = key_id

    @classmethod
    def create(cls, config: TokenConfig) -> TokenRoot:
        """Generate a new root key inside the token (never outside it): sensitive,
        non-extractable, unmodifiable, usable only to encrypt and decrypt."""
        session = _open_session(config)
        key_id = secrets.token_bytes(8)
        try:
            key = session.generate_key(
                KeyType.AES,
                256,
                id=key_id,
                label=f"cardvault-root-{key_id.hex()}",
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
        except PKCS11Error as exc:
            session.close()
            raise TokenUnavailable(
                f"the token could not create the root key: {type(exc).__name__}"
            ) from exc
        return cls(session, key, key_id)

    @classmethod
    def open(cls, config: TokenConfig, key_id: bytes) -> TokenRoot:
        session = _open_session(config)
        try:
            key = session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, id=key_id
            )
        except NoSuchKey as exc:
            session.close()
            raise TokenUnavailable(
                f"the token holds no root key with id {key_id.hex()}: wrong token?"
            ) from exc
        except PKCS11Error as exc:
            session.close()
            raise TokenUnavailable(f"the token failed: {type(exc).__name__}") from exc
        return cls(session, key, key_id)

    def _seal(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        nonce = bytes(self._session.generate_random(_NONCE_BYTES * 8))
        aad = TOKEN_AAD_LABEL + crypto.encode_context(context)
        body = self._key.encrypt(
            plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, _TAG_BITS)
        )
        return bytes([TOKEN_SEALED_FORMAT]) + nonce + bytes(body)

    def _open(self, sealed: bytes, context: dict[str, str]) -> bytes:
        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[0] != TOKEN_SEALED_FORMAT:
            raise crypto.InvalidCiphertext
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        aad = TOKEN_AAD_LABEL + crypto.encode_context(context)
        try:
            return bytes(
                self._key.decrypt(
                    body,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, _TAG_BITS),
                )
            )
        except PKCS11Error:
            raise crypto.InvalidCiphertext from None

    def check_blob(self) -> str:
        """A value only this key opens, stored in the seal metadata at creation."""
        return base64.b64encode(self._seal(_CHECK_PLAINTEXT, _CHECK_CONTEXT)).decode("ascii")

    def verify(self, check: str) -> None:
        """Raise :class:`crypto.KeyCheckMismatch` unless this key made ``check``."""
        try:
            if self._open(base64.b64decode(check), _CHECK_CONTEXT) == _CHECK_PLAINTEXT:
                return
        except (crypto.InvalidCiphertext, ValueError):
            pass
        raise crypto.KeyCheckMismatch

    def seal_kek(self, kek: crypto.Key) -> bytes:
        return self._seal(kek.expose_secret(), kek_context(kek.name, kek.version))

    def open_kek(self, name: str, version: int, sealed: bytes) -> crypto.Key:
        material = bytearray(self._open(sealed, kek_context(name, version)))
        return crypto.Key(name, version, material)

    def destroy(self) -> None:
        """Delete the key object from the token (a reseal that failed half-way)."""
        try:
            self._key.destroy()
        finally:
            self.wipe()

    def wipe(self) -> None:
        with contextlib.suppress(PKCS11Error):
            self._session.close()

    def meta(self, config: TokenConfig) -> dict[str, Any]:
        return {
            "type": "pkcs11",
            "token_label": config.token_label,
            "key_id": self.key_id.hex(),
            "check": self.check_blob(),
        }
