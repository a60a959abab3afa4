"""The forwarding API: ``/v1/forwarding/requests`` (Stripe's), the only way out for a card.

A caller with a secret key names a payment method, an allowlisted URL, the card values
to put in (``replacements``), and a request body and headers. :meth:`Forwarder.create`:

1. matches the URL against the static allowlist
   (:func:`~cardvault.vault.forwarding.allowlist.match_url`) for this method and
   account; anything else is refused with one opaque error;
2. refuses replacements the destination may not receive, headers it may not set, and
   any value or header holding a control character;
3. opens the card data: the data keys are unwrapped (the key service), the number is
   opened into its wipeable type and the CVC into a buffer (:class:`_OpenCard`), from
   the payment method as read; nothing is taken yet;
4. builds the request to send, with the real values, and the copy to store and return,
   with masked values (``424242******4242``, ``***``), from one reading of the same
   description (:func:`~cardvault.vault.forwarding.placement.build_requests`);
   credentials the vault adds are ``[REDACTED]`` in the stored copy. Every check that
   can fail has run by now;
5. records ``forward.requested`` and, in one transaction that is written only once the
   record is durable, stores the forwarding request as ``pending`` (under the id its
   Idempotency-Key claim chose) and *takes* the CVC (erases it: it can be sent once at
   most). Both are queued at once, so that the audit log's flush and the store's run in
   the same pass of the event loop, the record first (one durable write of the two, as
   issue 21 allows); the store checks that the record is durable before it writes, and
   writes nothing when it is not (:class:`~cardvault.storage.base.PreconditionFailed`);
6. sends the request to the destination's own URL
   (:mod:`~cardvault.vault.forwarding.outbound`) and wipes the card values. When the
   destination cannot have received anything (no connection, a failed TLS handshake),
   the pending request is deleted and the CVC put back in one transaction, and the
   answer is a 502 that may be retried with the same key. When it may have received the
   request (a timeout, a reset), the request is stored ``unknown`` and never sent again;
7. masks any card number in the response, and stores the request ``completed`` with
   ``forward.completed``.

A crash between 5 and 7 leaves the request ``pending``; a retry with the same key, or
the settler, reports it ``unknown`` and never sends it again
(:mod:`cardvault.vault.idempotency`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.cards import CardNumber
from cardvault.errors import (
    APIError,
    CardVaultError,
    IdempotencyKeyInUse,
    InvalidRequestError,
    ParameterMissing,
    ResourceMissing,
)
from cardvault.logging import bind_request_fields, get_logger
from cardvault.storage.base import (
    COMPLETED,
    PENDING,
    UNKNOWN,
    DuplicateError,
    EventRecord,
    ForwardingRequestRecord,
    PaymentMethodRecord,
    PreconditionFailed,
    TakenCvc,
    VaultStore,
)
from cardvault.vault.accounts import Caller, require_secret
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.events import Events
from cardvault.vault.forwarding.allowlist import REPLACEMENTS, Allowlist, Destination, match_url
from cardvault.vault.forwarding.outbound import (
    HOP_BY_HOP,
    DestinationUnreachable,
    OutboundClient,
    OutboundResponse,
)
from cardvault.vault.forwarding.placement import (
    REDACTED,
    CardValues,
    build_requests,
    caller_headers,
    mask_card_numbers,
    safe_header_value,
)
from cardvault.vault.idempotency import Claim
from cardvault.vault.ids import looks_like_id, time_ordered_id
from cardvault.vault.params import check_keys, list_object, parse_metadata, read_page
from cardvault.vault.payment_methods import find_payment_method, sealing_context

__all__ = ["Forwarder"]

_log = get_logger("cardvault.vault.forwarding")
_PARAMS = {"payment_method", "url", "replacements", "request", "metadata", "expand"}
_REQUEST_PARAMS = {"body", "headers"}
_DIGIT_RUN = re.compile(r"[0-9]+")


class _OpenCard:
    """A payment method's card values, opened for one forward.

    The number stays a :class:`~cardvault.cards.CardNumber` and the CVC a ``bytearray``
    (both wipeable) until :meth:`revealed`, the last moment, and :meth:`wipe` zeroes both
    when the forward is done. The cardholder name is a ``str``, as everywhere else in
    the vault (the API returns it decrypted); the expiry is stored in the clear anyway.
    """

    __slots__ = ("cvc", "exp_month", "exp_year", "name", "number")

    def __init__(
        self,
        number: CardNumber | None,
        cvc: bytearray | None,
        name: str | None,
        record: PaymentMethodRecord,
    ) -> None:
        self.number, self.cvc, self.name = number, cvc, name
        self.exp_month, self.exp_year = record.exp_month, record.exp_year

    def revealed(self) -> CardValues:
        """The real values as text, for :func:`build_request` alone.

        What remains a ``str`` (which cannot be wiped), and why: Python's HTTP clients
        take a request only as ``str`` and ``bytes``, and the placement engine writes
        JSON, forms and headers as text. So the number and the CVC are text from here
        until the request is sent: in these values, in the built body and headers, and
        in the body's bytes. Nothing keeps them after :meth:`Forwarder.create` returns.
        """
        return CardValues(
            number=str(self.number.digits_for_crypto(), "ascii") if self.number else None,
            exp_month=self.exp_month,
            exp_year=self.exp_year,
            cvc=self.cvc.decode("ascii") if self.cvc else None,
            name=self.name,
        )

    def masked(self) -> CardValues:
        """The values as the stored copy shows them."""
        return CardValues(
            number=self.number.masked() if self.number else None,
            exp_month=self.exp_month,
            exp_year=self.exp_year,
            cvc="***" if self.cvc else None,
            name=REDACTED if self.name else None,
        )

    def mask_cvc(self, text: str) -> str:
        """``text`` with the CVC masked where it stands alone (a provider that echoes it
        back). Digit runs are compared with the buffer: the CVC never becomes a pattern,
        which the ``re`` module would keep in its cache."""
        cvc = self.cvc
        if not cvc:
            return text
        return _DIGIT_RUN.sub(
            lambda m: "***" if m.group().encode("ascii") == cvc else m.group(), text
        )

    def wipe(self) -> None:
        if self.number is not None:
            self.number.wipe()
        if self.cvc is not None:
            self.cvc[:] = bytes(len(self.cvc))


@dataclass(frozen=True)
class _Forward:
    """A create's parameters, checked: what to send where."""

    pm_id: str
    destination: Destination
    replacements: list[str]
    body: str
    content_type: str
    headers: list[tuple[str, str]]
    metadata: dict[str, str]


class Forwarder:
    """The forwarding API: create (send a card to an allowlisted destination), retrieve
    and list the stored, masked forwarding requests.

    Receives what it uses and nothing more: the vault's store, its data keys (to open
    the card), the audit recorder, the allowlist (read once at start-up) and the
    outbound HTTPS client. Who may call is decided by :func:`require_secret`: the HTTP
    handler checks it before the body is read (:mod:`cardvault.vault.http`), the only
    way to :meth:`create`.
    """

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        audit: Recorder,
        allowlist: Allowlist,
        outbound: OutboundClient,
        *,
        events: Events | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.audit = audit
        self.allowlist = allowlist
        self.outbound = outbound
        #: None: no events are written (docs/reliability.md, "Events and webhooks").
        self.events = events

    # -- the API -------------------------------------------------------------------------

    async def create(
        self, caller: Caller, params: dict[str, Any], claim: Claim | None = None
    ) -> dict[str, Any]:
        """Send a card (module docstring). ``claim`` (from :class:`~cardvault.vault.
        idempotency.Idempotency`) names the id the forwarding request is stored under.
        The caller's key is a secret key (checked by the HTTP handler)."""
        claim = claim or Claim(time_ordered_id("fwdreq_"))
        fwd = self._read(caller, params)
        record = await find_payment_method(self.store, caller, fwd.pm_id)
        with_cvc = "card_cvc" in fwd.replacements
        if with_cvc and record.cvc_ct is None:
            raise _no_cvc()
        card = await self._open(caller, record, fwd.replacements)
        try:
            headers, payload, shown_body, shown_headers = self._outbound(fwd, card)
            pending = self._pending(caller, claim.effect_id, fwd, shown_body, shown_headers)
            # Recorded before anything is taken or leaves the vault: no record, no forward.
            # The pending row is written in the same pass, once the record is durable.
            recorded = self.audit.record_soon(
                "forward.requested",
                actor=caller.key_id,
                object_id=fwd.pm_id,
                detail={
                    "destination": fwd.destination.name,
                    "replacements": ",".join(fwd.replacements),
                    "forwarding_request": pending.id,
                },
            )
            taken = await self._start(caller, claim, pending, record, with_cvc, recorded)
            response = await self._send(caller, claim, fwd, pending, taken, headers, payload)
            del headers, payload  # sent: the card's text is not kept a moment longer
            response_body = card.mask_cvc(
                mask_card_numbers(response.body.decode("utf-8", errors="replace"))
            )
        finally:
            card.wipe()
        stored = dataclasses.replace(
            pending,
            outcome=COMPLETED,
            request_context={
                "destination_duration": response.duration_ms,
                "destination_ip_address": response.peer_ip,
            },
            response_details={
                "body": response_body,
                "headers": [
                    {"name": k, "value": mask_card_numbers(v)}
                    for k, v in response.headers
                    if k not in HOP_BY_HOP
                ],
                "status": response.status,
            },
        )
        await self._keep(caller, stored, response.status, cvc_used=with_cvc)
        # On the request's access line rather than a line of its own.
        bind_request_fields(
            forwarding_request=stored.id,
            payment_method=fwd.pm_id,
            destination=fwd.destination.name,
            destination_status=response.status,
            key=caller.key_id,
        )
        return self.render(stored)

    async def retrieve(self, caller: Caller, fwd_id: str) -> dict[str, Any]:
        require_secret(caller)
        record = None
        if looks_like_id(fwd_id, "fwdreq_"):
            record = await self.store.get_forwarding_request(
                caller.account_id, caller.livemode, fwd_id
            )
        if record is None:
            raise ResourceMissing("No such forwarding request.", param="id")
        return self.render(record)

    async def list_requests(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        require_secret(caller)
        fetch = partial(self.store.list_forwarding_requests, caller.account_id, caller.livemode)
        records, has_more = await read_page(query, "fwdreq_", fetch, params={"expand", "created"})
        return list_object("/v1/forwarding/requests", [self.render(r) for r in records], has_more)

    @staticmethod
    def render(record: ForwardingRequestRecord) -> dict[str, Any]:
        """Stripe's ``forwarding.request``, and its ``outcome``: ``completed`` (the
        destination answered: ``response_details``), ``pending`` (being sent now) or
        ``unknown`` (it may have reached the destination, whose answer was lost; never
        sent again). Only a completed request has ``request_context`` and
        ``response_details``; the others have null there."""
        completed = record.outcome == COMPLETED
        return {
            "id": record.id,
            "object": "forwarding.request",
            "created": record.created,
            "livemode": record.livemode,
            "metadata": record.metadata,
            "payment_method": record.payment_method,
            "replacements": record.replacements,
            "url": record.url,
            "outcome": record.outcome,
            "request_context": record.request_context if completed else None,
            "request_details": record.request_details,
            "response_details": record.response_details if completed else None,
        }

    # -- the steps of a create, in order ---------------------------------------------------

    def _read(self, caller: Caller, params: dict[str, Any]) -> _Forward:
        """The parameters, checked in the order the errors are documented."""
        check_keys(params, _PARAMS)
        pm_id = params.get("payment_method")
        if not isinstance(pm_id, str) or not pm_id:
            raise ParameterMissing(
                "Missing required param: payment_method.", param="payment_method"
            )
        url = params.get("url")
        if not isinstance(url, str) or not url:
            raise ParameterMissing("Missing required param: url.", param="url")
        destination = match_url(self.allowlist, url, method="POST", account_id=caller.account_id)
        replacements = params.get("replacements")
        if isinstance(replacements, dict):  # form: replacements[0]=… arrives as a mapping
            replacements = list(replacements.values())
        if not isinstance(replacements, list) or not replacements:
            raise ParameterMissing("Missing required param: replacements.", param="replacements")
        if any(r not in REPLACEMENTS for r in replacements) or len(set(replacements)) != len(
            replacements
        ):
            raise InvalidRequestError(
                "replacements may contain card_number, card_expiry, card_cvc and cardholder_name, once each.",
                param="replacements",
            )
        # Only replacements both requested and permitted are made; asking for one the
        # destination may not receive is an error, not a silent omission.
        if not set(replacements) <= destination.replacements:
            raise InvalidRequestError(
                "This destination may not receive one of the requested replacements.",
                param="replacements",
            )
        request = params.get("request") or {}
        if not isinstance(request, dict):
            raise InvalidRequestError("request must be a hash.", param="request")
        check_keys(request, _REQUEST_PARAMS, "request")
        body = request.get("body") or ""
        if not isinstance(body, str):
            raise InvalidRequestError("request[body] must be a string.", param="request[body]")
        headers = caller_headers(request.get("headers"), destination)
        metadata = parse_metadata(params.get("metadata"))
        content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
        if content_type is None:
            content_type = "application/json"
            headers.append(("Content-Type", content_type))
        return _Forward(pm_id, destination, replacements, body, content_type, headers, metadata)

    async def _open(
        self, caller: Caller, record: PaymentMethodRecord, replacements: list[str]
    ) -> _OpenCard:
        """The card values the forward asked for, opened from ``record`` as read: the
        data keys are unwrapped first (the key service may be down or sealed: nothing is
        taken then). The CVC is opened here and taken only when the request is about to
        leave (:meth:`_start`)."""
        number: CardNumber | None = None
        cvc: bytearray | None = None
        name = None
        try:
            if "card_number" in replacements or "cardholder_name" in replacements:
                key = await self.keys.for_decryption(record.data_key_id, "pan")
                if "card_number" in replacements:
                    plain = crypto.open_(
                        key, record.number_ct, sealing_context(caller, record.id, "number")
                    )
                    number = _card_number(plain, record.id)
                    del plain
                if "cardholder_name" in replacements and record.name_ct is not None:
                    name = crypto.open_(
                        key, record.name_ct, sealing_context(caller, record.id, "name")
                    ).decode()
            if "card_cvc" in replacements:
                if record.cvc_ct is None or record.cvc_data_key_id is None:
                    raise _no_cvc()
                cvc_key = await self.keys.for_decryption(record.cvc_data_key_id, "cvc")
                # crypto.open_ answers bytes, which cannot be wiped: copied at once into a
                # buffer that can, and the bytes dropped.
                cvc = bytearray(
                    crypto.open_(cvc_key, record.cvc_ct, sealing_context(caller, record.id, "cvc"))
                )
        except crypto.InvalidCiphertext as exc:
            if number is not None:
                number.wipe()
            _log.error("stored card data failed authentication", payment_method=record.id)
            raise APIError() from exc
        except BaseException:
            if number is not None:
                number.wipe()
            raise
        return _OpenCard(number, cvc, name, record)

    def _outbound(
        self, fwd: _Forward, card: _OpenCard
    ) -> tuple[list[tuple[str, str]], bytes, str, list[tuple[str, str]]]:
        """The request to send, its headers (the vault's credentials last) and body, and
        the masked copy's body and headers.

        The only place the card's values are revealed as text (see
        :meth:`_OpenCard.revealed`)."""
        destination = fwd.destination
        (out_body, out_headers), (shown_body, shown_headers) = build_requests(
            destination,
            fwd.replacements,
            fwd.body,
            fwd.content_type,
            fwd.headers,
            card.revealed(),
            card.masked(),
        )
        for _name, value in out_headers:
            safe_header_value(value, "request[headers]")
        if "\r" in (card.name or "") or "\n" in (card.name or ""):
            raise InvalidRequestError("The cardholder name cannot be forwarded in a header.")
        credentials = [(c.header_name, c.value.reveal()) for c in destination.credentials]
        payload = out_body.encode("utf-8")
        if len(payload) > destination.max_request_bytes:
            raise InvalidRequestError(
                "request[body] is larger than this destination accepts.", param="request[body]"
            )
        return out_headers + credentials, payload, shown_body, shown_headers

    def _pending(
        self,
        caller: Caller,
        fwd_id: str,
        fwd: _Forward,
        shown_body: str,
        shown_headers: list[tuple[str, str]],
    ) -> ForwardingRequestRecord:
        """The forwarding request as stored before it leaves: what is sent, masked."""
        destination = fwd.destination
        return ForwardingRequestRecord(
            id=fwd_id,
            account_id=caller.account_id,
            livemode=caller.livemode,
            created=int(time.time()),
            payment_method=fwd.pm_id,
            url=destination.url,
            destination=destination.name,
            replacements=list(fwd.replacements),
            metadata=fwd.metadata,
            request_details={
                "body": mask_card_numbers(shown_body),
                "headers": [{"name": k, "value": mask_card_numbers(v)} for k, v in shown_headers]
                + [{"name": c.header_name, "value": REDACTED} for c in destination.credentials],
                "http_method": "POST",
            },
            outcome=PENDING,
        )

    async def _start(
        self,
        caller: Caller,
        claim: Claim,
        pending: ForwardingRequestRecord,
        record: PaymentMethodRecord,
        with_cvc: bool,
        recorded: asyncio.Future[Any] | None,
    ) -> TakenCvc | None:
        """Store the forwarding request as pending and, in the same transaction, take
        the CVC, once ``recorded`` (``forward.requested``) is durable: the last durable
        step before the request leaves. The CVC as taken (to put back if nothing is
        sent), or None without one.

        A record that could not be made durable stops the forward with nothing written
        (503). A write that raised is not taken for "not written": the request is looked
        for, and found, it was stored (and the CVC taken) and the forward goes on."""
        claim.begin()
        try:
            if not with_cvc:
                await self.store.insert_forwarding_request(pending, after=recorded)
                taken = None
            else:
                taken = await self.store.take_cvc_for_forward(pending, after=recorded)
        except PreconditionFailed:
            # The record failed, so nothing was written: nothing happened.
            claim.undone()
            await self.audit.durable(recorded, "forward.requested")
            raise AssertionError("unreachable: the record failed") from None
        except DuplicateError as exc:
            await self.audit.durable(recorded, "forward.requested")
            # Another attempt of this same request stored it first: it is that one's to
            # send. The claim is kept, and a retry reports what became of it.
            raise IdempotencyKeyInUse() from exc
        except Exception:
            await self.audit.durable(recorded, "forward.requested")
            found = await self.store.get_forwarding_request(
                caller.account_id, caller.livemode, pending.id
            )
            if found is None or found.outcome != PENDING:
                raise
            _log.warning("a forwarding request was stored although its write raised")
            taken = _as_read(record) if with_cvc else None
            return taken
        await self.audit.durable(recorded, "forward.requested")
        if not with_cvc:
            return None
        if taken is None:
            # Taken by a concurrent forward since it was read: nothing was written.
            claim.undone()
            await self._not_sent(caller, pending, "no_cvc")
            raise _no_cvc()
        return taken

    async def _send(
        self,
        caller: Caller,
        claim: Claim,
        fwd: _Forward,
        pending: ForwardingRequestRecord,
        taken: TakenCvc | None,
        headers: list[tuple[str, str]],
        payload: bytes,
    ) -> OutboundResponse:
        destination = fwd.destination
        try:
            return await self.outbound.send(
                destination=destination.name,
                url=destination.url,
                method="POST",
                headers=headers,
                body=payload,
                timeout=destination.timeout,
                max_response_bytes=destination.max_response_bytes,
                ca_file=destination.ca_file,
                pins=destination.pin_sha256,
            )
        except DestinationUnreachable:
            # Nothing left the vault: the pending request goes and the CVC comes back, in
            # one transaction, and the key may be used again.
            if await self.store.cancel_forwarding_request(
                caller.account_id, caller.livemode, pending.id, taken
            ):
                claim.undone()
            await self._not_sent(caller, pending, "unreachable")
            raise
        except CardVaultError:
            # It may have reached the destination: never sent again.
            unknown = dataclasses.replace(pending, outcome=UNKNOWN)
            try:
                event = await self._event(unknown, "forwarding.request.failed")
            except CardVaultError:
                _log.error("a forward's event could not be made", forwarding_request=pending.id)
                event = None  # the destination's error is the answer
            await asyncio.gather(
                self.store.complete_forwarding_request(
                    caller.account_id, caller.livemode, pending.id, UNKNOWN, event=event
                ),
                self.audit.record(
                    "forward.completed",
                    actor=caller.key_id,
                    object_id=fwd.pm_id,
                    result="destination_error",
                    detail={"destination": destination.name, "forwarding_request": pending.id},
                ),
                *self._cvc_used(caller, pending, taken is not None),
                # The destination's error is the answer whatever becomes of these: a
                # request still pending is settled "unknown" later.
                return_exceptions=True,
            )
            raise

    async def _not_sent(
        self, caller: Caller, pending: ForwardingRequestRecord, reason: str
    ) -> None:
        """The follow-up of a ``forward.requested`` whose request never left."""
        await self.audit.record(
            "forward.not_sent",
            actor=caller.key_id,
            object_id=pending.id,
            result="error",
            detail={"reason": reason, "payment_method": pending.payment_method},
        )

    def _cvc_used(
        self, caller: Caller, pending: ForwardingRequestRecord, used: bool
    ) -> list[Awaitable[None]]:
        """The record of a CVC gone with a forward (none when there was no CVC)."""
        if not used:
            return []
        return [
            self.audit.record(
                "cvc.destroyed",
                actor=caller.key_id,
                object_id=pending.payment_method,
                detail={"reason": "used by a forward"},
            )
        ]

    async def _event(self, record: ForwardingRequestRecord, type: str) -> EventRecord | None:
        """The event written with the forward's outcome (the outbox), or None."""
        if self.events is None:
            return None
        return await self.events.make(record.account_id, record.livemode, type, self.render(record))

    async def _keep(
        self, caller: Caller, stored: ForwardingRequestRecord, status: int, *, cvc_used: bool
    ) -> None:
        """The forward has happened: its record and its audit records are all true
        whatever becomes of the others, so they are made durable together (one flush of
        each in the same loop iteration), and the answer waits for all."""
        try:
            event = await self._event(stored, "forwarding.request.created")
        except CardVaultError:
            # The forward happened: its outcome is stored even without its event (a data
            # key for the event could not be had: docs/reliability.md says so).
            _log.error("a forward's event could not be made", forwarding_request=stored.id)
            event = None
        outcomes = await asyncio.gather(
            self.store.complete_forwarding_request(
                stored.account_id,
                stored.livemode,
                stored.id,
                COMPLETED,
                stored.request_context,
                stored.response_details,
                event=event,
            ),
            self.audit.record(
                "forward.completed",
                actor=caller.key_id,
                object_id=stored.id,
                detail={
                    "destination": stored.destination,
                    "payment_method": stored.payment_method,
                    "status": status,
                },
            ),
            *self._cvc_used(caller, stored, cvc_used),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


def _no_cvc() -> InvalidRequestError:
    return InvalidRequestError(
        "This PaymentMethod has no CVC: it was never given, was already used by a "
        "forward, or has expired.",
        param="replacements",
    )


def _as_read(record: PaymentMethodRecord) -> TakenCvc | None:
    """The CVC a forward's transaction took, as the payment method was read before it."""
    if record.cvc_ct is None or record.cvc_data_key_id is None:
        return None
    return TakenCvc(record.cvc_ct, record.cvc_data_key_id, record.cvc_expires)


def _card_number(plain: bytes, pm_id: str) -> CardNumber:
    """The opened digits in the wipeable card-number type, at once.

    ``crypto.open_`` answers ``bytes``, which cannot be wiped (a copy the crypto layer
    makes; it goes when the caller drops it). They reach :meth:`CardNumber.parse`
    through an ``int``, which Python reads straight from the bytes, so no ``str`` of
    the number is made here. A stored number was checked when it was created; one that
    no longer parses is corrupt storage, not the caller's mistake."""
    try:
        return CardNumber.parse(int(plain))
    except (CardVaultError, ValueError) as exc:
        _log.error("stored card number is not a card number", payment_method=pm_id)
        raise APIError() from exc
