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
    KeyVersionUnavailable,
    ParameterMissing,
    ResourceMissing,
    UnsealShareInvalid,
)
from cardvault.files import write_private
from cardvault.keyservice.seals import (
    RootKey,
    SoftwareRoot,
    TokenConfig,
    TokenRoot,
    TokenUnavailable,
    check_approval,
    root_from_shares,
    split_approval,
)
from cardvault.logging import get_logger
from cardvault.storage import KeyStore, StoredKek

__all__ = ["KEK_KINDS", "KeyService", "UnsealProgress", "initialize", "version_states"]

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


def version_states(ring: crypto.Keyring) -> dict[str, str]:
    """Each version's state, oldest first: ``active`` (the newest: wraps and unwraps),
    ``decrypt_only`` (older, still unwraps), ``retired`` (below min_decryption_version:
    refuses everything, material still stored) or ``destroyed`` (material deleted)."""
    latest, held = ring.latest.version, set(ring.versions)
    states: dict[str, str] = {}
    for version in range(1, latest + 1):
        if version not in held:
            states[str(version)] = "destroyed"
        elif version == latest:
            states[str(version)] = "active"
        elif version < ring.min_decryption_version:
            states[str(version)] = "retired"
        else:
            states[str(version)] = "decrypt_only"
    return states


def _unwrap_error(ring: crypto.Keyring, wrapped: bytes) -> Exception:
    """Why a wrapped key did not open: a version retired or destroyed (410, a clear
    answer the vault passes on), else an invalid ciphertext (400)."""
    try:
        header = crypto.read_wrapped_key_header(wrapped)
    except (crypto.InvalidCiphertext, ValueError):
        return CiphertextInvalid(param="ciphertext")
    state = version_states(ring).get(str(header.kek_version))
    if header.kek_name == ring.name and state in ("retired", "destroyed"):
        return KeyVersionUnavailable(
            f"This data key is wrapped under a {state} key version; it can no longer be unwrapped.",
            param="ciphertext",
        )
    return CiphertextInvalid(param="ciphertext")


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
    token: TokenConfig | None = None,
) -> list[crypto.Share]:
    """Create the root key and the first version of every KEK in an empty store.

    Returns the custodian shares: of the root key (Shamir seal), or of an approval key
    (PKCS#11 seal, whose root key is generated inside the token and never leaves it: K
    approval shares approve a key version's destruction); none for the development
    seal, whose root key is written to ``dev_key_file``. The root key itself is never
    written anywhere else.
    """
    await store.migrate()
    if await store.get_meta(_META_ROOT_KCV) is not None:
        raise ConfigurationError(
            "the key service is already initialized; refusing to replace its keys"
        )
    if token is not None:
        return await _initialize_in_token(store, token, shares=shares, threshold=threshold)
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


async def _initialize_in_token(
    store: KeyStore, token: TokenConfig, *, shares: int, threshold: int
) -> list[crypto.Share]:
    try:
        root = TokenRoot.create(token)
    except TokenUnavailable as exc:
        raise ConfigurationError(f"cannot initialize the PKCS#11 seal: {exc}") from exc
    out: list[crypto.Share] = []
    try:
        approval, out = split_approval(shares, threshold)
        seal_meta = {**root.meta(token), "approval": approval}
        now = int(time.time())
        for name in KEK_KINDS:
            with crypto.Key.generate(name, 1) as kek:
                sealed = root.seal_kek(kek)
            await store.add_kek(StoredKek(name, 1, sealed, now))
        await store.set_meta(_META_SEAL, json.dumps(seal_meta))
        await store.set_meta(_META_ROOT_KCV, f"token:{root.key_id.hex()}")
        await store.append_event(
            "cli", "init", "ok",
            json.dumps({"type": "pkcs11", "approval": {"shares": shares, "threshold": threshold}}),
        )  # fmt: skip
        return out
    except BaseException:
        for share in out:
            share.wipe()
        raise
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
        self._root: RootKey | None = None
        self._rings: dict[str, crypto.Keyring] = {}
        self._pending: list[crypto.Share] = []
        self._pending_since = 0.0
        self._seal_meta: dict[str, Any] = {}
        self._kcv = ""
        #: One rotation at a time: each stores version ``latest + 1`` before using it.
        self._rotating = asyncio.Lock()
        #: Custodian approvals of a version's destruction, by (name, version): shares.
        self._destroy_approvals: dict[tuple[str, int], list[crypto.Share]] = {}
        self._destroy_since = 0.0

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

    async def start(
        self, *, dev_key_file: Path | None = None, token: TokenConfig | None = None
    ) -> None:
        """Load metadata; with ``dev_key_file`` (development seal), unseal from it; with
        ``token`` (PKCS#11 seal), unseal from the token, or stay sealed and say why when
        the token refuses (a wrong PIN, no token, no root key in it)."""
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
            root = SoftwareRoot(crypto.Key(ROOT_KEY_NAME, 1, material))
            await self._unseal_with(root, actor="dev-seal")
        stored_type = self._seal_meta.get("type")
        if (token is not None) != (stored_type == "pkcs11"):
            raise ConfigurationError(
                f"seal.type does not match this store, which is sealed with {stored_type!r}: "
                "after `cardvault keyservice reseal`, set seal.type to the new seal"
            )
        if token is not None:
            await self._unseal_from_token(token)
        await self._event("service", "start", "sealed" if self.sealed else "unsealed", "")

    async def _unseal_from_token(self, token: TokenConfig) -> None:
        try:
            root = TokenRoot.open(token, bytes.fromhex(self._seal_meta["key_id"]))
        except TokenUnavailable as exc:
            await self._event("token", "unseal", "refused", str(exc))
            _log.error("key service stays sealed: the PKCS#11 token refused", reason=str(exc))
            return
        try:
            root.verify(self._seal_meta["check"])
        except crypto.KeyCheckMismatch:
            root.wipe()
            await self._event("token", "unseal", "wrong_key", "")
            _log.error("key service stays sealed: the token's key is not this store's root key")
            return
        await self._unseal_with(root, actor="token")

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
                f"This key service uses the {self._seal_meta.get('type')} seal; shares do not "
                "apply (the PKCS#11 seal unseals from its token at start: restart it)."
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
            root = root_from_shares(self._seal_meta, crypto.shamir_combine(self._pending))
        except crypto.InvalidShare as exc:
            self._wipe_pending()
            await self._event(actor, "unseal", "rejected", str(exc))
            raise UnsealShareInvalid() from exc
        finally:
            self._wipe_pending()
        await self._unseal_with(SoftwareRoot(root), actor=actor)
        return UnsealProgress(False, 0, self.threshold)

    async def _unseal_with(self, root: RootKey, *, actor: str) -> None:
        if isinstance(root, SoftwareRoot):
            try:
                crypto.verify_key_check_value(root.key, self._kcv)
            except crypto.KeyCheckMismatch as exc:
                root.wipe()
                await self._event(actor, "unseal", "wrong_key", "")
                raise UnsealShareInvalid() from exc
        stored = await self.store.list_keks()
        minimums = await self.store.min_decryption_versions()
        rings: dict[str, list[crypto.Key]] = {}
        try:
            for kek in stored:
                opened = root.open_kek(kek.name, kek.version, kek.sealed)
                rings.setdefault(kek.name, []).append(opened)
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
        self._wipe_destroy_approvals()
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
                "states": version_states(ring),
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
            raise _unwrap_error(ring, wrapped) from exc

    def rewrap(self, name: str, wrapped: bytes) -> tuple[bytes, int]:
        ring = self._ring(name, "datakey")
        try:
            return ring.rewrap_key(wrapped, purpose=name), ring.latest.version
        except crypto.InvalidCiphertext as exc:
            raise _unwrap_error(ring, wrapped) from exc

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
            sealed = self._root.seal_kek(new)
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

    # -- destruction (crypto-shredding) --------------------------------------------------

    async def destroy(
        self, name: str, version: int, *, share: str | None, actor: str
    ) -> dict[str, Any]:
        """Approve, and after ``threshold`` custodian approvals carry out, the destruction
        of a retired KEK version: its sealed material is deleted from the store and its
        key wiped from memory. Irreversible: whatever it wrapped can never be unwrapped.

        Approval is the unseal's: each custodian submits their Shamir share; the K-th
        valid one rebuilds the root key, which must match the stored check value (then
        is wiped at once). A bad share wipes every approval given so far. The
        development seal has no custodians and needs none.
        """
        if name not in KEK_KINDS:
            raise ResourceMissing("No key with this name.")
        ring = self._ring(name, KEK_KINDS[name])
        state = version_states(ring).get(str(version))
        target = (name, version)
        if state == "destroyed":
            return {"object": "keyservice.destroy", "name": name, "version": version,
                    "destroyed": True, "progress": 0, "threshold": self.threshold}  # fmt: skip
        if state != "retired":
            raise InvalidRequestError(
                "Only a retired version can be destroyed: retire it first "
                "(every stored key re-encrypted, min_decryption_version above it).",
                param="version",
            )
        seal_type = self._seal_meta.get("type")
        approvals: list[int] = []
        split = self._approval_split()
        if split is not None:
            split_id, threshold = split
            pending = self._destroy_approvals.setdefault(target, [])
            if pending and self._clock() - self._destroy_since > self.unseal_timeout:
                self._wipe_destroy_approvals()
                pending = self._destroy_approvals.setdefault(target, [])
            if not share:
                raise ParameterMissing(param="share")
            try:
                parsed = crypto.Share.from_text(share)
                if parsed.split_id.hex() != split_id or parsed.threshold != threshold:
                    raise crypto.InvalidShare("the share belongs to another split")
                if any(p.index == parsed.index for p in pending):
                    raise crypto.InvalidShare("this share was already submitted")
            except crypto.InvalidShare as exc:
                self._wipe_destroy_approvals()
                await self._event(actor, "destroy_approval", "rejected", f"{name} v{version}")
                raise UnsealShareInvalid() from exc
            if not pending:
                self._destroy_since = self._clock()
            pending.append(parsed)
            await self._event(
                actor, "destroy_approval", "accepted", f"{name} v{version} index={parsed.index}"
            )
            if len(pending) < threshold:
                return {"object": "keyservice.destroy", "name": name, "version": version,
                        "destroyed": False, "progress": len(pending),
                        "threshold": threshold}  # fmt: skip
            approvals = sorted(p.index for p in pending)
            try:
                self._check_approval(crypto.shamir_combine(pending))
            except (crypto.InvalidShare, crypto.KeyCheckMismatch) as exc:
                await self._event(actor, "destroy", "wrong_key", f"{name} v{version}")
                raise UnsealShareInvalid() from exc
            finally:
                self._wipe_destroy_approvals()
        elif seal_type != "dev":
            raise InvalidRequestError(
                "This seal has no custodian shares to approve a destruction with: "
                "`cardvault keyservice rekey` gives it approval shares."
            )
        async with self._rotating:
            ring = self._ring(name, KEK_KINDS[name])
            if version_states(ring).get(str(version)) != "retired":
                raise InvalidRequestError(
                    "Only a retired version can be destroyed.", param="version"
                )
            # Deleted from the store first (durably, the file's free pages and WAL
            # scrubbed): a crash after this leaves nothing to load at the next unseal.
            await self.store.delete_kek(name, version)
            doomed = ring.key(version)
            self._rings[name] = crypto.Keyring(
                [ring.key(v) for v in ring.versions if v != version],
                min_decryption_version=ring.min_decryption_version,
            )
            # Wiped after the swap: a reader holding the old ring meets a wiped key
            # (an error), never a decryption under zeros.
            doomed.wipe()
        await self._event(
            actor, "destroy", "ok", f"{name} v{version} approvals={approvals or seal_type}"
        )
        _log.warning("key version destroyed", name=name, version=version, actor=actor)
        return {"object": "keyservice.destroy", "name": name, "version": version,
                "destroyed": True, "progress": 0,
                "threshold": split[1] if split else 1}  # fmt: skip

    def _approval_split(self) -> tuple[str, int] | None:
        """``(split id, threshold)`` of the custodian shares that approve a destruction:
        the unseal shares (Shamir seal) or the approval shares (PKCS#11 seal); None for
        the development seal (no custodians) and for a seal without either."""
        meta = self._seal_meta
        if meta.get("type") == "shamir":
            return str(meta["split_id"]), int(meta["threshold"])
        approval = meta.get("approval")
        if meta.get("type") == "pkcs11" and isinstance(approval, dict):
            return str(approval["split_id"]), int(approval["threshold"])
        return None

    def _check_approval(self, material: bytearray) -> None:
        """What K approving shares rebuilt is the right key: the root key, matching its
        check value (Shamir seal; wiped at once), or the approval key (PKCS#11)."""
        if self._seal_meta.get("type") == "shamir":
            # Direct or wrapped Shamir seal (keyservice/seals.py): the root key either way.
            with root_from_shares(self._seal_meta, material) as rebuilt:
                crypto.verify_key_check_value(rebuilt, self._kcv)
        else:
            check_approval(self._seal_meta["approval"], material)

    def _wipe_destroy_approvals(self) -> None:
        for shares in self._destroy_approvals.values():
            for share in shares:
                share.wipe()
        self._destroy_approvals = {}
