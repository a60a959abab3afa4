"""The vault's side of card export (docs/migration.md, "Exporting").

An export sends every card of one account and mode, PGP-encrypted, to one recipient of
the static allowlist (:mod:`.recipients`), once ``k`` custodians have approved that
very export (:mod:`.approval`). The pipeline, all in this process's memory and pipes::

    store ─page─▶ open each card (data keys from keyd) ─JSON line─▶ pipe ─▶ gpg --encrypt
                                                                             │
                              HTTP response (the admin API) ◀── ciphertext ──┘

The plaintext never touches a disk: it is built a page at a time, written into a pipe
that gpg reads, and only gpg's output leaves. If anything fails midway the stream is
cut without gpg's last packets (whatever was sent fails authentication at the
recipient) and ``export.failed`` is audited.

Audited: every share submitted (``export.approval``, accepted or rejected), a completed
approval (``export.approved``), every refused export (``export.refused`` with its
reason), the export before its first byte (``export.started``) and after its last
(``export.completed`` with the count) or its failure (``export.failed``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson

from cardvault import crypto, pgp
from cardvault.audit.recorder import Recorder
from cardvault.audit.text import untrusted_text
from cardvault.errors import APIError, ExportRefused, InvalidRequestError, ResourceMissing
from cardvault.logging import get_logger
from cardvault.storage.base import PaymentMethodRecord, VaultStore
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.exports.approval import Approvals, Target
from cardvault.vault.exports.recipients import Recipient, Recipients
from cardvault.vault.payment_methods import card_context

__all__ = ["Exports", "parse_export_request"]

_log = get_logger("cardvault.vault")

#: Cards read from the store, opened and written to gpg at a time.
_PAGE = 500
#: Ciphertext chunks, and plaintext pages, in flight between the threads and the loop.
_QUEUE = 8
_FIELDS = {"account", "mode", "recipient"}


def parse_export_request(body: dict[str, Any], *, share: bool) -> dict[str, Any]:
    """An export's (or an approval's) parameters, each checked and bounded: ``account``,
    ``mode`` (test or live), ``recipient`` and, for an approval, ``share``."""
    allowed = _FIELDS | ({"share"} if share else set())
    for name in body:
        if name not in allowed:
            raise InvalidRequestError(f"Unknown parameter: {str(name)[:64]}.", param="body")
    account = body.get("account")
    if not isinstance(account, str) or not account.startswith("acct_") or len(account) > 64:
        raise InvalidRequestError("account must be an account id (acct_…).", param="account")
    mode = body.get("mode", "test")
    if mode not in ("test", "live"):
        raise InvalidRequestError("mode is test or live.", param="mode")
    recipient = body.get("recipient")
    if (
        not isinstance(recipient, str)
        or not 0 < len(recipient) <= 64
        or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in recipient)
    ):
        raise InvalidRequestError(
            "recipient is the name of a recipient of the export allowlist.", param="recipient"
        )
    parsed = {"account": account, "mode": mode, "recipient": recipient.lower()}
    if share:
        text = body.get("share")
        if not isinstance(text, str) or not 0 < len(text) <= 512:
            raise InvalidRequestError(
                "share is a custodian's export-approval share.", param="share"
            )
        parsed["share"] = text
    return parsed


class Exports:
    """Card export (module docstring)."""

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        audit: Recorder,
        recipients: Recipients,
        approvals: Approvals | None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.audit = audit
        self.recipients = recipients
        self.approvals = approvals

    def list_recipients(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"object": "export_recipient", "name": r.name, "fingerprint": r.fingerprint,
                 "usable": r.refused is None, "refused": r.refused, "detail": r.detail or None}
                for r in self.recipients.by_name.values()
            ],
            "approval": None if self.approvals is None else {
                "shares": self.approvals.check.shares,
                "threshold": self.approvals.check.threshold,
            },
        }  # fmt: skip

    async def _refuse(
        self, actor: str, target: Target, reason: str, message: str, action: str = "export.refused"
    ) -> ExportRefused:
        # The account and the recipient are the caller's text here (a refused name may
        # be anything the request's charset allows, digits of a card number included).
        await self.audit.record(
            action,
            actor=actor,
            result="refused",
            detail={"account": untrusted_text(target[0]), "mode": target[1],
                    "recipient": untrusted_text(target[2]), "reason": reason},
        )  # fmt: skip
        return ExportRefused(reason, message)

    async def _allowed(self, actor: str, target: Target, action: str) -> Recipient:
        """The recipient ``target`` names, usable; else refused (and audited)."""
        recipient = self.recipients.get(target[2])
        if recipient is None:
            raise await self._refuse(
                actor, target, "recipient_not_allowed",
                "This recipient is not on the vault's export allowlist ([exports] "
                "recipients_file); recipients are configured, never named at run time.",
                action,
            )  # fmt: skip
        if recipient.refused is not None:
            raise await self._refuse(
                actor, target, recipient.refused,
                f"This recipient's key was refused when the vault started: {recipient.detail}.",
                action,
            )  # fmt: skip
        if self.approvals is None:
            raise await self._refuse(
                actor, target, "approval_not_configured",
                "Exports need custodian approval: configure [exports] approval_file "
                "(`cardvault export-approval create`).",
                action,
            )  # fmt: skip
        if await self.store.get_account(target[0]) is None:
            raise ResourceMissing("No such account.", param="account")
        return recipient

    async def approve(self, actor: str, request: dict[str, Any]) -> dict[str, Any]:
        """One custodian's approval of the export ``request`` names."""
        target: Target = (request["account"], request["mode"], request["recipient"])
        await self._allowed(actor, target, "export.approval")
        assert self.approvals is not None
        try:
            progress, index = self.approvals.submit(target, request["share"])
        except crypto.InvalidShare:
            raise await self._refuse(
                actor, target, "approval_share_invalid",
                "The share does not approve exports (another split, malformed, given twice, "
                "or the shares rebuild a wrong key). Every approval given so far was wiped.",
                "export.approval",
            ) from None  # fmt: skip
        detail: dict[str, str | int | bool | None] = {
            "mode": target[1], "recipient": target[2], "index": index,
            "progress": progress.progress, "threshold": progress.threshold,
        }  # fmt: skip
        await self.audit.record(
            "export.approval", actor=actor, object_id=target[0], result="accepted", detail=detail
        )
        if progress.approved:
            await self.audit.record(
                "export.approved", actor=actor, object_id=target[0],
                detail={"mode": target[1], "recipient": target[2],
                        "expires_in": progress.expires_in},
            )  # fmt: skip
        return {"object": "export_approval", "account": target[0], "mode": target[1],
                "recipient": target[2], "progress": progress.progress,
                "threshold": progress.threshold, "approved": progress.approved,
                "expires_in": progress.expires_in}  # fmt: skip

    async def export(self, actor: str, request: dict[str, Any]) -> AsyncIterator[bytes]:
        """Check the export (allowlisted recipient, approved), use up its approval, audit
        its start; returns the ciphertext stream (module docstring)."""
        target: Target = (request["account"], request["mode"], request["recipient"])
        recipient = await self._allowed(actor, target, "export.refused")
        assert self.approvals is not None
        if not self.approvals.take(target):
            status = self.approvals.status(target)
            raise await self._refuse(
                actor, target, "not_approved",
                f"This export is not approved: {status['progress']} of {status['threshold']} "
                "custodian approvals (`cardvault export-approval submit`).",
            )  # fmt: skip
        await self.audit.record(
            "export.started", actor=actor, object_id=target[0],
            detail={"mode": target[1], "recipient": target[2], "key": recipient.key_id},
        )  # fmt: skip
        return self._stream(actor, target, recipient)

    def _line(self, target: Target, key: crypto.Key, record: PaymentMethodRecord) -> bytes:
        number = crypto.open_(
            key, record.number_ct, card_context(target[0], target[1], record.id, "number")
        )
        name = None
        if record.name_ct is not None:
            name = crypto.open_(
                key, record.name_ct, card_context(target[0], target[1], record.id, "name")
            ).decode("utf-8")
        return orjson.dumps(
            {"id": record.id, "object": "payment_method", "created": record.created,
             "livemode": record.livemode,
             "card": {"number": number.decode("ascii"), "exp_month": record.exp_month,
                      "exp_year": record.exp_year, "brand": record.brand,
                      "last4": record.last4, "funding": record.funding,
                      "fingerprint": record.fingerprint},
             "billing_details": {"name": name, **record.billing_details},
             "metadata": record.metadata},
            option=orjson.OPT_APPEND_NEWLINE,
        )  # fmt: skip

    async def _feed(self, target: Target, pages: queue.Queue[bytearray | None]) -> int:
        """Every card of the account and mode, newest first, opened and handed to the
        writer thread a page at a time; the count."""
        count = 0
        after: str | None = None
        livemode = target[1] == "live"
        while True:
            records = await self.store.list_payment_methods(
                target[0], livemode, limit=_PAGE, starting_after=after
            )
            if not records:
                return count
            page = bytearray()
            for record in records:
                key = await self.keys.for_decryption(record.data_key_id, "pan")
                try:
                    page += self._line(target, key, record)
                except crypto.InvalidCiphertext as exc:
                    _log.error("stored card data failed authentication", payment_method=record.id)
                    raise APIError() from exc
            # The writer thread zeroes the page once gpg has it.
            await asyncio.to_thread(pages.put, page)
            count += len(records)
            after = records[-1].id
            if len(records) < _PAGE:
                return count

    async def _stream(
        self, actor: str, target: Target, recipient: Recipient
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[bytes] = asyncio.Queue(_QUEUE)
        pages: queue.Queue[bytearray | None] = queue.Queue(_QUEUE)
        #: Set when the export is abandoned: gpg's output is dropped from then on, so
        #: that a cut-off export never ends in a well-formed message.
        stop = threading.Event()
        read_fd, write_fd = os.pipe()

        def writer() -> None:
            """Pages into the pipe gpg reads; the pipe closed (gpg's end of input) when
            the pages end."""
            with os.fdopen(write_fd, "wb") as fh:
                while (page := pages.get()) is not None:
                    if stop.is_set():
                        continue
                    try:
                        fh.write(page)
                        fh.flush()
                    except OSError:  # gpg gone: the encryption task says why
                        stop.set()
                    finally:
                        page[:] = bytes(len(page))

        def on_chunk(chunk: bytes) -> None:
            future = asyncio.run_coroutine_threadsafe(out.put(chunk), loop)
            while not stop.is_set():
                try:
                    future.result(timeout=0.5)
                    return
                except concurrent.futures.TimeoutError:
                    continue
            future.cancel()

        def encrypt() -> None:
            with os.fdopen(read_fd, "rb") as source:
                pgp.encrypt_stream(
                    recipient.public_key,
                    recipient.fingerprint,
                    source,
                    lambda chunk: None if stop.is_set() else on_chunk(chunk),
                )

        async def feed() -> int:
            try:
                return await self._feed(target, pages)
            except BaseException:
                stop.set()  # before the pipe closes: gpg's last packets are dropped
                raise
            finally:
                await asyncio.to_thread(pages.put, None)

        writing = asyncio.ensure_future(asyncio.to_thread(writer))
        encrypting = asyncio.ensure_future(asyncio.to_thread(encrypt))
        feeding = asyncio.ensure_future(feed())
        count = 0
        sent = 0
        try:
            while True:
                getter = asyncio.ensure_future(out.get())
                await asyncio.wait([getter, encrypting], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    chunk = getter.result()
                elif not out.empty():
                    getter.cancel()
                    chunk = out.get_nowait()
                else:
                    getter.cancel()
                    break
                if feeding.done() and feeding.exception() is not None:
                    break
                sent += len(chunk)
                yield chunk
            # gpg ends well only after the pipe closed, after the last page: the cards
            # are all read (or failed) by then.
            await encrypting  # raises PgpError
            count = await feeding  # raises what stopped the cards
            if stop.is_set():
                raise pgp.PgpError("gpg_failed", "gpg stopped reading")
        except BaseException as exc:
            stop.set()
            await self.audit.record(
                "export.failed", actor=actor, object_id=target[0], result="error",
                detail={"mode": target[1], "recipient": target[2],
                        "error": type(exc).__name__, "bytes": sent},
            )  # fmt: skip
            raise
        finally:
            stop.set()
            feeding.cancel()
            for task in (feeding, writing, encrypting):
                # What they raised is reported above; here they are only waited for.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)
        await self.audit.record(
            "export.completed", actor=actor, object_id=target[0],
            detail={"mode": target[1], "recipient": target[2], "key": recipient.key_id,
                    "cards": count, "bytes": sent},
        )  # fmt: skip
