"""The key service: a sealed root key, the KEKs it protects, and the operations on them.

State machine::

    sealed ──share──▶ sealed (progress k/K) ──K-th valid share──▶ unsealed
       ▲                    │ wrong share / timeout: progress wiped      │
       └────────────────────┴──────────────── seal ◀────────────────────┘

* The **root key** exists only in this process's memory while unsealed. It is rebuilt
  from K of N Shamir shares and checked against the stored key check value, so a wrong
  share is detected (and all partial shares wiped) rather than silently producing a
  wrong key. The development seal reads it from a local file instead and is refused in
  the production profile.
* **KEKs** are stored sealed under the root key, each bound (associated data) to its
  name and version. They never leave the process: no operation returns one.
* **Data keys** are fresh AES-256 keys, returned once in plaintext (to the vault, over
  mutual TLS) and wrapped under the newest KEK version, bound to the KEK's purpose.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.errors import (
    CiphertextInvalid,
    ConfigurationError,
    InvalidRequestError,
    KeyServiceSealed,
    ResourceMissing,
    UnsealShareInvalid,
)
from cardvault.files import write_private
from cardvault.logging import get_logger
from cardvault.storage import KeyStore, StoredKek

__all__ = ["KEK_KINDS", "KeyService", "UnsealProgress", "initialize"]

#: Every KEK the service creates at init, and what it may be used for. ``datakey`` KEKs
#: wrap data keys (the vault's card numbers and CVCs live under different ones, so a key
#: issued for one purpose can never unwrap as the other); ``derive`` KEKs only derive
#: per-account keys (fingerprints).
KEK_KINDS: dict[str, str] = {"pan": "datakey", "cvc": "datakey", "fingerprint": "derive"}
ROOT_KEY_NAME = "root"
DATA_KEY_NAME = "dek"
_META_ROOT_KCV = "root_kcv"
_META_SEAL = "seal"
_log = get_logger("cardvault.keyservice")


def _kek_context(name: str, version: int) -> dict[str, str]:
    return {"kek": name, "version": str(version)}


@dataclass(frozen=True)
class UnsealProgress:
    sealed: bool
    progress: int
    threshold: int


async def initialize(
    store: KeyStore,
    *,
    shares: int,
    threshold: int,
    dev_key_file: Path | None = None,
) -> list[crypto.Share]:
    """Create the root key and the first version of every KEK in an empty store.

    Returns the custodian shares (empty for the development seal, whose root key is
    written to ``dev_key_file`` instead). The root key itself is never written
    anywhere else: after this returns it exists only in the shares.
    """
    await store.migrate()
    if await store.get_meta(_META_ROOT_KCV) is not None:
        raise ConfigurationError(
            "the key service is already initialized; refusing to replace its keys"
        )
    root = crypto.Key.generate(ROOT_KEY_NAME, 1)
    try:
        out: list[crypto.Share] = []
        if dev_key_file is not None:
            write_private(dev_key_file, root.expose_secret())
            seal_meta: dict[str, Any] = {"type": "dev"}
        else:
            out = crypto.shamir_split(root.expose_secret(), shares, threshold)
            seal_meta = {
                "type": "shamir",
                "shares": shares,
                "threshold": threshold,
                "split_id": out[0].split_id.hex(),
            }
        now = int(time.time())
        for name in KEK_KINDS:
            with crypto.Key.generate(name, 1) as kek:
                sealed = crypto.seal(root, kek.expose_secret(), _kek_context(name, 1))
            await store.add_kek(StoredKek(name, 1, sealed, now))
        await store.set_meta(_META_SEAL, json.dumps(seal_meta))
        await store.set_meta(_META_ROOT_KCV, crypto.key_check_value(root))
        await store.append_event("cli", "init", "ok", json.dumps(seal_meta))
        return out
    finally:
        root.wipe()


class KeyService:
    """The key service's operations. Every method that needs keys raises
    :class:`KeyServiceSealed` while sealed."""

    def __init__(
        self,
        store: KeyStore,
        *,
        unseal_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        audit: Recorder | None = None,
    ) -> None:
        self.store = store
        self.audit = audit or Recorder(None)
        self.unseal_timeout = unseal_timeout
        self._clock = clock
        self._root: crypto.Key | None = None
        self._rings: dict[str, crypto.Keyring] = {}
        self._pending: list[crypto.Share] = []
        self._pending_since = 0.0
        self._seal_meta: dict[str, Any] = {}
        self._kcv = ""
        #: One rotation at a time: each stores version ``latest + 1`` before using it.
        self._rotating = asyncio.Lock()

    async def _event(self, actor: str, action: str, result: str, detail: str) -> None:
        """Record an event in the store's event table and in the audit log (fail closed)."""
        await self.store.append_event(actor, action, result, detail)
        await self.audit.record(
            f"keyservice.{action}",
            actor=actor,
            result=result,
            detail={"detail": detail[:200]} if detail else None,
            origin="local" if actor in ("service", "shutdown", "dev-seal") else None,
        )

    # -- start-up ----------------------------------------------------------------------

    async def start(self, *, dev_key_file: Path | None = None) -> None:
        """Load metadata; with ``dev_key_file`` (development seal), unseal from it."""
        await self.store.migrate()
        kcv = await self.store.get_meta(_META_ROOT_KCV)
        meta = await self.store.get_meta(_META_SEAL)
        if kcv is None or meta is None:
            raise ConfigurationError(
                "the key service is not initialized: run `cardvault keyservice init` first"
            )
        self._kcv = kcv
        self._seal_meta = json.loads(meta)
        if dev_key_file is not None:
            if self._seal_meta.get("type") != "dev":
                raise ConfigurationError(
                    "seal.type is dev but this store was initialized with shares"
                )
            material = bytearray(dev_key_file.read_bytes())
            await self._unseal_with(crypto.Key(ROOT_KEY_NAME, 1, material), actor="dev-seal")
        await self._event("service", "start", "sealed" if self.sealed else "unsealed", "")

    @property
    def sealed(self) -> bool:
        return self._root is None

    @property
    def threshold(self) -> int:
        return int(self._seal_meta.get("threshold", 1))

    # -- seal and unseal -----------------------------------------------------------------

    def _wipe_pending(self) -> None:
        for share in self._pending:
            share.wipe()
        self._pending = []

    def _pending_expired(self) -> bool:
        return bool(self._pending) and self._clock() - self._pending_since > self.unseal_timeout

    async def submit_share(self, text: str, *, actor: str) -> UnsealProgress:
        """Add one custodian share. After ``threshold`` valid shares the service unseals.

        A malformed share, a share of another split, a repeated share, or a set of shares
        that rebuilds the wrong key wipes all progress and raises UnsealShareInvalid.
        """
        if not self.sealed:
            await self._event(actor, "unseal_share", "already_unsealed", "")
            return UnsealProgress(False, 0, self.threshold)
        if self._seal_meta.get("type") != "shamir":
            raise InvalidRequestError(
                "This key service uses the development seal; shares do not apply."
            )
        if self._pending_expired():
            self._wipe_pending()
            await self._event(actor, "unseal_progress_expired", "wiped", "")
        try:
            share = crypto.Share.from_text(text)
            if (
                share.split_id.hex() != self._seal_meta["split_id"]
                or share.threshold != self.threshold
            ):
                raise crypto.InvalidShare("the share belongs to another split")
            if any(p.index == share.index for p in self._pending):
                raise crypto.InvalidShare("this share was already submitted")
        except crypto.InvalidShare as exc:
            self._wipe_pending()
            await self._event(actor, "unseal_share", "rejected", str(exc))
            raise UnsealShareInvalid() from exc
        if not self._pending:
            self._pending_since = self._clock()
        self._pending.append(share)
        await self._event(actor, "unseal_share", "accepted", f"index={share.index}")
        if len(self._pending) < self.threshold:
            return UnsealProgress(True, len(self._pending), self.threshold)
        try:
            material = crypto.shamir_combine(self._pending)
        except crypto.InvalidShare as exc:
            self._wipe_pending()
            await self._event(actor, "unseal", "rejected", str(exc))
            raise UnsealShareInvalid() from exc
        finally:
            self._wipe_pending()
        await self._unseal_with(crypto.Key(ROOT_KEY_NAME, 1, material), actor=actor)
        return UnsealProgress(False, 0, self.threshold)

    async def _unseal_with(self, root: crypto.Key, *, actor: str) -> None:
        try:
            crypto.verify_key_check_value(root, self._kcv)
        except crypto.KeyCheckMismatch as exc:
            root.wipe()
            await self._event(actor, "unseal", "wrong_key", "")
            raise UnsealShareInvalid() from exc
        stored = await self.store.list_keks()
        minimums = await self.store.min_decryption_versions()
        rings: dict[str, list[crypto.Key]] = {}
        try:
            for kek in stored:
                context = _kek_context(kek.name, kek.version)
                material = bytearray(crypto.open_(root, kek.sealed, context))
                rings.setdefault(kek.name, []).append(crypto.Key(kek.name, kek.version, material))
        except crypto.InvalidCiphertext as exc:
            root.wipe()
            for keys in rings.values():
                for key in keys:
                    key.wipe()
            await self._event(actor, "unseal", "store_corrupt", "")
            raise ConfigurationError("a stored KEK does not open under the root key") from exc
        self._rings = {
            name: crypto.Keyring(keys, min_decryption_version=minimums.get(name, 1))
            for name, keys in rings.items()
        }
        self._root = root
        await self._event(actor, "unseal", "ok", "")
        _log.info("key service unsealed", actor=actor)

    async def seal(self, *, actor: str) -> None:
        """Wipe the root key and every KEK from memory."""
        self._wipe_pending()
        if self._root is not None:
            self._root.wipe()
        for ring in self._rings.values():
            ring.wipe()
        self._root = None
        self._rings = {}
        await self._event(actor, "seal", "ok", "")
        _log.info("key service sealed", actor=actor)

    # -- key operations ------------------------------------------------------------------

    def _ring(self, name: str, kind: str) -> crypto.Keyring:
        if KEK_KINDS.get(name) != kind:
            raise ResourceMissing(f"No {kind} key with this name.")
        if self._root is None:
            raise KeyServiceSealed()
        return self._rings[name]

    def status(self) -> dict[str, Any]:
        keys = {
            name: {
                "latest_version": ring.latest.version,
                "versions": list(ring.versions),
                "min_decryption_version": ring.min_decryption_version,
                "kind": KEK_KINDS[name],
            }
            for name, ring in sorted(self._rings.items())
        }
        return {
            "object": "keyservice.status",
            "sealed": self.sealed,
            "seal_type": self._seal_meta.get("type"),
            "threshold": self.threshold,
            "shares": self._seal_meta.get("shares"),
            # Expired shares are wiped at the next submission; until then they no longer count.
            "progress": 0 if self._pending_expired() else len(self._pending),
            "keys": keys,
        }

    def datakey(self, name: str) -> tuple[bytes, bytes, int]:
        """A fresh data key: ``(plaintext, wrapped, kek_version)``."""
        ring = self._ring(name, "datakey")
        with crypto.Key.generate(DATA_KEY_NAME, 1) as dek:
            wrapped = ring.wrap_key(dek, purpose=name)
            return dek.expose_secret(), wrapped, ring.latest.version

    def unwrap(self, name: str, wrapped: bytes) -> bytes:
        ring = self._ring(name, "datakey")
        try:
            with ring.unwrap_key(wrapped, purpose=name) as dek:
                return dek.expose_secret()
        except crypto.InvalidCiphertext as exc:
            raise CiphertextInvalid(param="ciphertext") from exc

    def rewrap(self, name: str, wrapped: bytes) -> tuple[bytes, int]:
        ring = self._ring(name, "datakey")
        try:
            return ring.rewrap_key(wrapped, purpose=name), ring.latest.version
        except crypto.InvalidCiphertext as exc:
            raise CiphertextInvalid(param="ciphertext") from exc

    def derive(self, name: str, context: str, version: int | None = None) -> tuple[bytes, int]:
        """A per-account key (HKDF of the KEK, ``context`` = account id)."""
        ring = self._ring(name, "derive")
        chosen = ring.latest.version if version is None else version
        if chosen < ring.min_decryption_version or chosen not in ring.versions:
            raise InvalidRequestError("This key version is not available.", param="version")
        try:
            derived = crypto.derive_account_key(ring.key(chosen), context, purpose=name)
        except ValueError as exc:
            # The context becomes part of a key name: printable ASCII, no spaces, bounded.
            raise InvalidRequestError(
                "The context must be printable ASCII without spaces, "
                f"at most {254 - len(name)} characters.",
                param="context",
            ) from exc
        with derived as key:
            return key.expose_secret(), chosen

    async def rotate(self, name: str, *, actor: str) -> dict[str, Any]:
        if name not in KEK_KINDS:
            raise ResourceMissing("No key with this name.")
        async with self._rotating:
            ring = self._ring(name, KEK_KINDS[name])
            assert self._root is not None
            new = crypto.Key.generate(name, ring.latest.version + 1)
            sealed = crypto.seal(self._root, new.expose_secret(), _kek_context(name, new.version))
            # Stored before it is used: a version that is not durable must never wrap a
            # data key, which nothing could unwrap after a restart. The store unavailable
            # (a 503, try again later), the ring is unchanged and the key forgotten.
            try:
                await self.store.add_kek(StoredKek(name, new.version, sealed, int(time.time())))
            except BaseException:
                new.wipe()
                raise
            if self._rings.get(name) is not ring:
                # Sealed meanwhile: the stored version is loaded at the next unseal.
                new.wipe()
                raise KeyServiceSealed()
            self._rings[name] = crypto.Keyring(
                [*(ring.key(version) for version in ring.versions), new],
                min_decryption_version=ring.min_decryption_version,
            )
        await self._event(actor, "rotate", "ok", f"{name} v{new.version}")
        return self.status()["keys"][name]  # type: ignore[no-any-return]

    async def configure(
        self, name: str, *, min_decryption_version: int, actor: str
    ) -> dict[str, Any]:
        if name not in KEK_KINDS:
            raise ResourceMissing("No key with this name.")
        ring = self._ring(name, KEK_KINDS[name])
        try:
            ring.set_min_decryption_version(min_decryption_version)
        except ValueError as exc:
            raise InvalidRequestError(
                "min_decryption_version must be between 1 and the newest version.",
                param="min_decryption_version",
            ) from exc
        await self.store.set_min_decryption_version(name, min_decryption_version)
        await self._event(
            actor, "config", "ok", f"{name} min_decryption_version={min_decryption_version}"
        )
        return self.status()["keys"][name]  # type: ignore[no-any-return]
