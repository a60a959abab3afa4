"""Ceremonies on a stopped key service: moving to another seal, re-keying the shares.

Both run from the command line (``cardvault keyservice reseal`` / ``rekey``) against the
key service's own store while the service is **stopped**: the caller holds the service's
audit log (``flock``), which a running key service holds too, so the two cannot overlap.
Both need the current seal opened first: K current custodian shares (Shamir), the
token and its PIN (PKCS#11), or the development key file.

* :func:`reseal` — a **new root key** under the target seal (generated inside the token
  for PKCS#11; split into new shares for Shamir), and every stored KEK version sealed
  again under it, in one transaction. The KEKs themselves do not change, so no data key
  and no card ciphertext is touched. The old seal (old shares, the old token key) opens
  nothing in the database afterwards.
* :func:`rekey` — new custodian shares (new N, new K) for the **same root key**: a new
  unseal key is split and the root key sealed under it (``seals.split_root``); the key
  check value stays. The old shares belong to a split the service no longer knows and
  rebuild an unseal key that opens nothing stored.

Each records one event in the store and one audit record (``keyservice.reseal`` /
``keyservice.rekey``) with what changed, never a share or key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.errors import ConfigurationError
from cardvault.keyservice.seals import (
    ROOT_KEY_NAME,
    RootKey,
    SoftwareRoot,
    TokenConfig,
    TokenRoot,
    TokenUnavailable,
    check_approval,
    root_from_shares,
    split_approval,
    split_root,
)
from cardvault.storage import KeyStore, StoredKek

__all__ = ["CeremonyError", "rekey", "reseal"]

SealType = Literal["shamir", "pkcs11"]


class CeremonyError(ConfigurationError):
    """The ceremony cannot go on (wrong shares, token refused …); nothing was changed."""


async def _load(store: KeyStore) -> tuple[dict[str, Any], str]:
    await store.migrate()
    meta, kcv = await store.get_meta("seal"), await store.get_meta("root_kcv")
    if meta is None or kcv is None:
        raise CeremonyError("the key service is not initialized")
    return json.loads(meta), kcv


def _shares_root(meta: dict[str, Any], kcv: str, texts: list[str]) -> crypto.Key:
    """The root key from K current shares, checked against the stored check value."""
    threshold = int(meta["threshold"])
    if len(texts) < threshold:
        raise CeremonyError(f"{threshold} current custodian shares are needed, got {len(texts)}")
    parsed: list[crypto.Share] = []
    try:
        for text in texts:
            share = crypto.Share.from_text(text)
            parsed.append(share)
            if share.split_id.hex() != meta["split_id"]:
                raise CeremonyError(
                    f"share {share.index} belongs to another split (split "
                    f"{share.split_id.hex()}; this key service's shares are split "
                    f"{meta['split_id']}): an old share, replaced by a re-key or reseal?"
                )
        root = root_from_shares(meta, crypto.shamir_combine(parsed))
    except crypto.InvalidShare as exc:
        raise CeremonyError(f"the shares do not open this key service: {exc}") from exc
    finally:
        for share in parsed:
            share.wipe()
    try:
        crypto.verify_key_check_value(root, kcv)
    except crypto.KeyCheckMismatch:
        root.wipe()
        raise CeremonyError("the shares rebuild the wrong root key") from None
    return root


def _approval_from_shares(approval: dict[str, Any], texts: list[str]) -> None:
    """K current approval shares, checked: they rebuild the approval key of the seal."""
    threshold = int(approval["threshold"])
    if len(texts) < threshold:
        raise CeremonyError(f"{threshold} current approval shares are needed, got {len(texts)}")
    parsed: list[crypto.Share] = []
    try:
        for text in texts:
            share = crypto.Share.from_text(text)
            parsed.append(share)
            if share.split_id.hex() != approval["split_id"]:
                raise CeremonyError(
                    f"share {share.index} belongs to another split: an old approval share?"
                )
        check_approval(approval, crypto.shamir_combine(parsed))
    except crypto.InvalidShare as exc:
        raise CeremonyError(f"the approval shares do not match this key service: {exc}") from exc
    finally:
        for share in parsed:
            share.wipe()


def _open_current(
    meta: dict[str, Any],
    kcv: str,
    *,
    shares: list[str],
    token: TokenConfig | None,
    dev_key_file: Path | None,
) -> RootKey:
    kind = meta.get("type")
    if kind == "shamir":
        return SoftwareRoot(_shares_root(meta, kcv, shares))
    if kind == "pkcs11":
        if token is None:
            raise CeremonyError(
                "this key service is sealed in a PKCS#11 token: set seal.pkcs11_module, "
                "seal.pkcs11_token_label and seal.pkcs11_pin_file to open it"
            )
        try:
            root = TokenRoot.open(token, bytes.fromhex(meta["key_id"]))
        except TokenUnavailable as exc:
            raise CeremonyError(f"cannot open the current seal: {exc}") from exc
        try:
            root.verify(meta["check"])
        except crypto.KeyCheckMismatch:
            root.wipe()
            raise CeremonyError("the token's key is not this key service's root key") from None
        return root
    if kind == "dev":
        if dev_key_file is None:
            raise CeremonyError("this key service uses the development seal: set seal.dev_key_file")
        key = crypto.Key(ROOT_KEY_NAME, 1, bytearray(dev_key_file.read_bytes()))
        try:
            crypto.verify_key_check_value(key, kcv)
        except crypto.KeyCheckMismatch:
            key.wipe()
            raise CeremonyError("seal.dev_key_file is not this key service's root key") from None
        return SoftwareRoot(key)
    raise CeremonyError(f"unknown seal type {kind!r} in the store")


async def _record(
    store: KeyStore, audit: Recorder, action: str, detail: dict[str, str | int]
) -> None:
    await store.append_event("cli", action, "ok", json.dumps(detail, sort_keys=True))
    await audit.record(f"keyservice.{action}", actor="cli", origin="local", detail=detail)


async def reseal(
    store: KeyStore,
    audit: Recorder,
    *,
    to: SealType,
    shares: list[str],
    new_shares: int,
    new_threshold: int,
    token: TokenConfig | None,
    dev_key_file: Path | None = None,
) -> list[crypto.Share]:
    """Move the key service to the ``to`` seal under a new root key (see the module's
    docstring). Returns the new custodian shares: of the root key (Shamir) or of the
    approval key (PKCS#11)."""
    meta, kcv = await _load(store)
    source = meta.get("type")
    current = _open_current(meta, kcv, shares=shares, token=token, dev_key_file=dev_key_file)
    stored = await store.list_keks()
    keks: list[crypto.Key] = []
    target: RootKey | None = None
    created: TokenRoot | None = None
    out: list[crypto.Share] = []
    try:
        try:
            keks = [current.open_kek(k.name, k.version, k.sealed) for k in stored]
        except crypto.InvalidCiphertext:
            raise CeremonyError("a stored KEK does not open under the current root key") from None
        if to == "pkcs11":
            if token is None:
                raise CeremonyError(
                    "--to pkcs11 needs seal.pkcs11_module, seal.pkcs11_token_label and "
                    "seal.pkcs11_pin_file in the configuration"
                )
            try:
                created = target = TokenRoot.create(token)
            except TokenUnavailable as exc:
                raise CeremonyError(f"cannot create the root key in the token: {exc}") from exc
            # Custodians still approve a destruction: K of new approval shares.
            approval, out = split_approval(new_shares, new_threshold)
            new_meta = {**created.meta(token), "approval": approval}
            new_kcv = f"token:{created.key_id.hex()}"
        else:
            new_root = crypto.Key.generate(ROOT_KEY_NAME, 1)
            target = SoftwareRoot(new_root)
            new_meta, out = split_root(new_root, new_shares, new_threshold)
            new_kcv = crypto.key_check_value(new_root)
        resealed = [
            StoredKek(k.name, k.version, target.seal_kek(kek), k.created)
            for k, kek in zip(stored, keks, strict=True)
        ]
        try:
            await store.replace_seal(resealed, {"seal": json.dumps(new_meta), "root_kcv": new_kcv})
        except BaseException:
            if created is not None:
                created.destroy()  # the store still names the old seal: drop the new key
                created = target = None
            raise
        detail: dict[str, str | int] = {"from": str(source), "to": to, "keks": len(resealed)}
        detail |= {"shares": new_shares, "threshold": new_threshold}
        if to == "shamir":
            detail["split_id"] = str(new_meta["split_id"])
        else:
            detail["approval_split_id"] = str(new_meta["approval"]["split_id"])
            detail["hsm_key_id"] = str(new_meta["key_id"])
        await _record(store, audit, "reseal", detail)
        return out
    except BaseException:
        for share in out:
            share.wipe()
        raise
    finally:
        current.wipe()
        if target is not None:
            target.wipe()
        for kek in keks:
            kek.wipe()


async def rekey(
    store: KeyStore,
    audit: Recorder,
    *,
    shares: list[str],
    new_shares: int,
    new_threshold: int,
    token: TokenConfig | None = None,
) -> list[crypto.Share]:
    """New custodian shares for the same root key (Shamir seal) or the same approval
    key (PKCS#11 seal); the old shares stop working."""
    meta, kcv = await _load(store)
    if meta.get("type") == "shamir":
        root = _shares_root(meta, kcv, shares)
        try:
            new_meta, out = split_root(root, new_shares, new_threshold)
        finally:
            root.wipe()
        old = meta
        split = new_meta
    elif meta.get("type") == "pkcs11":
        # The root key stays in the token; the custodians' approval shares are
        # replaced: K current ones are needed, or, for a seal made before approval
        # shares existed, the token itself (its PIN file) opened and checked.
        old = meta.get("approval") or {}
        if old:
            _approval_from_shares(old, shares)
        else:
            _open_current(meta, kcv, shares=[], token=token, dev_key_file=None).wipe()
        approval, out = split_approval(new_shares, new_threshold)
        new_meta = {**meta, "approval": approval}
        split = approval
    else:
        raise CeremonyError(
            f"this key service uses the {meta.get('type')} seal, which has no custodian "
            "shares: `cardvault keyservice reseal --to shamir` makes some"
        )
    try:
        # One statement: the new split replaces the old one whole.
        await store.set_meta("seal", json.dumps(new_meta))
        await _record(
            store,
            audit,
            "rekey",
            {
                "seal": str(meta.get("type")),
                "old_split_id": str(old.get("split_id", "")),
                "old_shares": int(old.get("shares", 0)),
                "old_threshold": int(old.get("threshold", 0)),
                "split_id": str(split["split_id"]),
                "shares": new_shares,
                "threshold": new_threshold,
                "at": int(time.time()),
            },
        )
    except BaseException:
        for share in out:
            share.wipe()
        raise
    return out
