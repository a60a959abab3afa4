"""PaymentMethods: Stripe's card objects, sealed at rest.

A card number enters as a :class:`~cardvault.cards.CardNumber` (a wipeable buffer),
is fingerprinted and sealed under a data key, and is wiped before the response is
built. What is stored: the ciphertext, the data key's id (its wrapped form is stored
separately), and the non-secret facts Stripe returns (brand, last four, expiry,
funding, fingerprint). Associated data (:func:`sealing_context`) binds every
ciphertext to its account, mode, object id and field, so a ciphertext copied into
another row does not open.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.cards import (
    CVC,
    CardDataError,
    CardNumber,
    Expiry,
    brand_info,
    check_card_allowed,
    holds_card_number,
    validate_cvc,
    validate_expiry,
)
from cardvault.errors import (
    APIError,
    CardVaultError,
    InvalidRequestError,
    ParameterMissing,
    ResourceMissing,
    error_class_for,
)
from cardvault.logging import bind_request_fields, get_logger
from cardvault.storage.base import (
    DuplicateError,
    EventRecord,
    PaymentMethodRecord,
    UnstorableValue,
    VaultStore,
)
from cardvault.vault.accounts import Caller, require_secret
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.events import Events
from cardvault.vault.idempotency import Claim
from cardvault.vault.ids import looks_like_id, time_ordered_id
from cardvault.vault.params import check_keys, list_object, parse_metadata, read_page

__all__ = ["PaymentMethods", "find_payment_method", "sealing_context"]

_log = get_logger("cardvault.vault")

_NAME_MAX = 200
_PM_PARAMS = {"type", "card", "billing_details", "metadata", "expand"}
_CARD_PARAMS = {"number", "exp_month", "exp_year", "cvc"}
_BILLING_PARAMS = {"name", "email", "phone", "address"}
_ADDRESS_PARAMS = {"line1", "line2", "city", "state", "postal_code", "country"}
#: The order Stripe's objects list them in (alphabetical).
_ADDRESS_FIELDS = tuple(sorted(_ADDRESS_PARAMS))
#: The longest billing detail other than the name that is kept (email, phone, and each
#: address field).
_BILLING_MAX = 500


def card_context(account_id: str, mode: str, pm_id: str, field: str) -> dict[str, str]:
    """The associated data a payment method's ``field`` (``number``, ``name``, ``cvc``)
    is sealed under: its account, mode and id."""
    return {"account": account_id, "mode": mode, "object": pm_id, "field": field}


def sealing_context(caller: Caller, pm_id: str, field: str) -> dict[str, str]:
    """:func:`card_context` for the caller's account and mode."""
    return card_context(caller.account_id, caller.mode, pm_id, field)


def _no_such_payment_method(pm_id: str) -> ResourceMissing:
    """Stripe's "No such PaymentMethod: 'pm_…'", naming the id only when it has the shape
    of one of ours: anything else the caller put in the path may be a card number."""
    if looks_like_id(pm_id, "pm_"):
        return ResourceMissing(f"No such PaymentMethod: '{pm_id}'", param="payment_method")
    return ResourceMissing("No such PaymentMethod.", param="payment_method")


async def find_payment_method(store: VaultStore, caller: Caller, pm_id: str) -> PaymentMethodRecord:
    """The caller's payment method ``pm_id`` (of its account and mode), or 404."""
    record = None
    if looks_like_id(pm_id, "pm_"):
        record = await store.get_payment_method(caller.account_id, caller.livemode, pm_id)
    if record is None:
        raise _no_such_payment_method(pm_id)
    return record


def _billing_text(value: object, param: str) -> str | None:
    """A billing detail as stored: a string of at most ``_BILLING_MAX`` characters, or
    None when absent or empty. Numbers are refused like any other non-string: stored
    and echoed as given, a huge integer would be an answer that cannot be written."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _BILLING_MAX:
        raise InvalidRequestError(
            f"{param} must be a string of at most {_BILLING_MAX} characters.", param=param
        )
    return value


def _billing_details(billing: dict[str, Any], address: dict[str, Any]) -> dict[str, Any]:
    """The billing details kept in the clear (the name is sealed apart): email, phone and
    the address, each checked by :func:`_billing_text`, none holding a card number."""
    out: dict[str, Any] = {}
    if billing.keys() <= {"name"}:
        return out
    texts: list[str] = []
    for key in ("email", "phone"):
        text = _billing_text(billing.get(key), f"billing_details[{key}]")
        if text is not None:
            out[key] = text
            texts.append(text)
    if address:
        out["address"] = {}
        for key in _ADDRESS_FIELDS:
            text = _billing_text(address.get(key), f"billing_details[address][{key}]")
            if text is not None:
                out["address"][key] = text
                texts.append(text)
    if any(holds_card_number(text) for text in texts):
        raise InvalidRequestError(
            "billing_details must not contain card numbers.", param="billing_details"
        )
    return out


@dataclass(frozen=True)
class _Create:
    """A create's parameters once their names and shapes are checked; the card's own
    fields (number, expiry, CVC) are checked after these, in :meth:`create_payment_method`."""

    card: dict[str, Any]
    name: str | None
    metadata: dict[str, str]
    billing: dict[str, Any]


def _create_params(params: dict[str, Any]) -> _Create:
    """Names and shapes first, in the order docs/api.md lists them (the first failure is
    the answer)."""
    check_keys(params, _PM_PARAMS)
    if params.get("type") in (None, ""):
        raise ParameterMissing("Missing required param: type.", param="type")
    if params["type"] != "card":
        raise InvalidRequestError("Only type=card is supported.", param="type")
    card = params.get("card")
    if card in (None, ""):
        raise ParameterMissing("Missing required param: card.", param="card")
    if not isinstance(card, dict):
        raise InvalidRequestError("card must be a hash.", param="card")
    check_keys(card, _CARD_PARAMS, "card")
    billing = params.get("billing_details") or {}
    if not isinstance(billing, dict):
        raise InvalidRequestError("billing_details must be a hash.", param="billing_details")
    check_keys(billing, _BILLING_PARAMS, "billing_details")
    address = billing.get("address") or {}
    if not isinstance(address, dict):
        raise InvalidRequestError("address must be a hash.", param="billing_details[address]")
    check_keys(address, _ADDRESS_PARAMS, "billing_details[address]")
    metadata = parse_metadata(params.get("metadata"))
    other_billing = _billing_details(billing, address)
    name = billing.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > _NAME_MAX):
        raise InvalidRequestError(
            "billing_details[name] must be a string.", param="billing_details[name]"
        )
    return _Create(card, name, metadata, other_billing)


@contextmanager
def card_data_as_api_errors() -> Iterator[None]:
    """Card code's errors (:mod:`cardvault.cards.errors`, no HTTP there) as the API's:
    the class of the same code, with the same message and parameter."""
    try:
        yield
    except CardDataError as exc:
        raise error_class_for(exc.code)(exc.message, param=exc.param) from exc


class PaymentMethods:
    """The PaymentMethods API: create (seal), retrieve, list, delete, and the sweep that
    destroys CVCs past their time.

    Needs the store, the data keys (:class:`~cardvault.vault.datakeys.DataKeyManager`,
    the vault's only way to the key service) and the audit recorder. Every operation is
    recorded before its answer; one that cannot be recorded is refused (fail closed).
    """

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        *,
        cvc_ttl: int = 3600,
        audit: Recorder | None = None,
        events: Events | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.cvc_ttl = cvc_ttl
        self.audit = audit or Recorder(None)
        #: None: no events are written (docs/reliability.md, "Events and webhooks").
        self.events = events

    async def create_payment_method(
        self, caller: Caller, params: dict[str, Any], claim: Claim | None = None
    ) -> dict[str, Any]:
        """Seal and store a card. ``claim`` (from :class:`~cardvault.vault.idempotency.
        Idempotency`) names the id to store it under; without one a new id is made.

        Audit before effect: ``payment_method.created`` is durable before the row is
        written, so no row can exist without its record. The record of a row that never
        came is followed by ``payment_method.not_stored`` (here when the write certainly
        failed, else by the settler, docs/audit.md)."""
        claim = claim or Claim(time_ordered_id("pm_"))
        new = _create_params(params)
        record, display_brand = await self._prepared(caller, claim.effect_id, new)
        # Made before the audit record: what can fail (a data key) fails with nothing done.
        rendered = self._render(record, name=new.name, display_brand=display_brand)
        event = await self._event(caller, "payment_method.created", rendered)
        # Fail closed: a card whose creation cannot be recorded is never stored.
        await self.audit.record(
            "payment_method.created",
            actor=caller.key_id,
            object_id=record.id,
            detail={"livemode": caller.livemode, "brand": record.brand},
        )
        record = await self._store(caller, record, claim, event)
        # On the request's access line rather than a line of its own: one line per
        # request is a measurable share of a tokenization's cost.
        bind_request_fields(payment_method=record.id, key=caller.key_id, livemode=caller.livemode)
        return self._render(record, name=new.name, display_brand=display_brand)

    async def _event(self, caller: Caller, type: str, obj: dict[str, Any]) -> EventRecord | None:
        """The event to write with the change (the outbox), or None without events."""
        if self.events is None:
            return None
        return await self.events.make(caller.account_id, caller.livemode, type, obj)

    async def _prepared(
        self, caller: Caller, pm_id: str, new: _Create
    ) -> tuple[PaymentMethodRecord, str]:
        """The card's own fields checked (number, expiry, the mode's cards, CVC) and the
        record to store as ``pm_id`` sealed; with the card's display brand. The number
        and CVC are wiped before this returns, whatever happens."""
        card = new.card
        with card_data_as_api_errors():
            number = CardNumber.parse(card.get("number"))
        cvc = None
        try:
            with card_data_as_api_errors():
                expiry = validate_expiry(card.get("exp_month"), card.get("exp_year"))
                check_card_allowed(number, livemode=caller.livemode)
                if card.get("cvc") not in (None, ""):
                    cvc = validate_cvc(card.get("cvc"), number.brand)
            record = await self._sealed(caller, pm_id, new, number, expiry, cvc)
            return record, number.display_brand
        finally:
            number.wipe()
            if cvc is not None:
                cvc.wipe()

    async def prepare_import(
        self, caller: Caller, params: dict[str, Any], pm_id: str
    ) -> PaymentMethodRecord:
        """For bulk import (:mod:`cardvault.vault.imports`): the record a create with
        ``params`` would store as ``pm_id`` (the same checks, fingerprint and sealing),
        neither recorded nor stored: the importer records one audit record per batch
        and stores the batch in one transaction. Raises the create's errors."""
        new = _create_params(params)
        record, _display_brand = await self._prepared(caller, pm_id, new)
        return record

    async def prepare_imports(
        self, caller: Caller, params: Sequence[dict[str, Any]], pm_ids: Sequence[str]
    ) -> list[PaymentMethodRecord | CardVaultError]:
        """:meth:`prepare_import` for a batch of rows: for each of ``params``, the record
        to store as the id at the same place in ``pm_ids``, or the error a create with
        those parameters would raise (the rest of the batch goes on)."""
        out: list[PaymentMethodRecord | CardVaultError] = []
        for one, pm_id in zip(params, pm_ids, strict=True):
            try:
                record = await self.prepare_import(caller, one, pm_id)
            except CardVaultError as exc:
                out.append(exc)
            else:
                out.append(record)
        return out

    async def _store(
        self,
        caller: Caller,
        record: PaymentMethodRecord,
        claim: Claim,
        event: EventRecord | None = None,
    ) -> PaymentMethodRecord:
        """Insert the row; the row as stored. A write that raised is not taken for "not
        written" (on PostgreSQL a commit whose acknowledgement was lost raises): the row
        is looked for, and the error stands only when it is not there."""
        claim.begin()
        try:
            await self.store.insert_payment_method(record, event=event)
        except UnstorableValue as exc:
            # Nothing ran. (The parser refuses such text first; this is the net under it.)
            claim.undone()
            await self._not_stored(caller, record.id, "unstorable")
            raise InvalidRequestError("A parameter holds text that cannot be stored.") from exc
        except DuplicateError as exc:
            # The claim's id is taken: an earlier attempt of this same request stored it.
            stored = await self.store.get_payment_method(
                caller.account_id, caller.livemode, record.id
            )
            if stored is None:
                raise APIError() from exc
            return stored
        except Exception:
            stored = await self.store.get_payment_method(
                caller.account_id, caller.livemode, record.id
            )
            if stored is None:
                # Unknown: not there now, and perhaps committed later. The claim is kept
                # (docs/api.md, "Idempotency"); the settler writes the follow-up.
                raise
            _log.warning("a payment method was stored although its write raised")
            return stored
        return record

    async def _not_stored(self, caller: Caller, pm_id: str, reason: str) -> None:
        """The follow-up of a ``payment_method.created`` whose row never came."""
        await self.audit.record(
            "payment_method.not_stored",
            actor=caller.key_id,
            object_id=pm_id,
            result="error",
            detail={"reason": reason, "livemode": caller.livemode},
        )

    async def _sealed(
        self,
        caller: Caller,
        pm_id: str,
        new: _Create,
        number: CardNumber,
        expiry: Expiry,
        cvc: CVC | None,
    ) -> PaymentMethodRecord:
        """The record to store as ``pm_id``: the number (and name, and CVC) sealed, the
        facts kept."""
        account_key = await self.keys.account_key(caller.account_id)
        fingerprint = crypto.fingerprint(account_key, number.digits_for_crypto())
        dk_id, dk = await self.keys.for_encryption("pan")
        number_ct = crypto.seal(
            dk, number.digits_for_crypto(), sealing_context(caller, pm_id, "number")
        )
        name_ct = (
            crypto.seal(dk, new.name.encode("utf-8"), sealing_context(caller, pm_id, "name"))
            if new.name
            else None
        )
        cvc_ct = cvc_dk_id = cvc_expires = None
        if cvc is not None:
            cvc_dk_id, cvc_dk = await self.keys.for_encryption("cvc")
            cvc_ct = crypto.seal(
                cvc_dk, cvc.digits_for_crypto(), sealing_context(caller, pm_id, "cvc")
            )
            cvc_expires = int(time.time()) + self.cvc_ttl
        return PaymentMethodRecord(
            id=pm_id,
            account_id=caller.account_id,
            livemode=caller.livemode,
            created=int(time.time()),
            data_key_id=dk_id,
            number_ct=number_ct,
            brand=str(number.brand),
            last4=number.last4,
            exp_month=expiry.month,
            exp_year=expiry.year,
            funding=str(number.funding),
            fingerprint=fingerprint,
            name_ct=name_ct,
            metadata=new.metadata,
            billing_details=new.billing,
            cvc_ct=cvc_ct,
            cvc_data_key_id=cvc_dk_id,
            cvc_expires=cvc_expires,
            cvc_check="unchecked" if cvc is not None else None,
        )

    async def retrieve_payment_method(self, caller: Caller, pm_id: str) -> dict[str, Any]:
        require_secret(caller)
        record = await find_payment_method(self.store, caller, pm_id)
        name = await self._open_name(caller, record)
        await self.audit.record("payment_method.read", actor=caller.key_id, object_id=pm_id)
        return self._render(record, name=name)

    async def list_payment_methods(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        require_secret(caller)
        fetch = partial(self.store.list_payment_methods, caller.account_id, caller.livemode)
        records, has_more = await read_page(query, "pm_", fetch, params={"type", "expand"})
        data = [self._render(r, name=await self._open_name(caller, r)) for r in records]
        await self.audit.record(
            "payment_method.listed", actor=caller.key_id, detail={"count": len(data)}
        )
        return list_object("/v1/payment_methods", data, has_more)

    async def delete_payment_method(self, caller: Caller, pm_id: str) -> dict[str, Any]:
        require_secret(caller)
        record = await find_payment_method(self.store, caller, pm_id)
        event = None
        if self.events is not None:
            # The event carries the card as it was, as Stripe's payment_method.detached.
            rendered = self._render(record, name=await self._open_name(caller, record))
            event = await self._event(caller, "payment_method.deleted", rendered)
        # Recorded first: if the record cannot be written, nothing is deleted.
        await self.audit.record("payment_method.deleted", actor=caller.key_id, object_id=pm_id)
        if not await self.store.delete_payment_method(
            caller.account_id, caller.livemode, pm_id, event=event
        ):
            raise _no_such_payment_method(pm_id)
        return {"id": pm_id, "object": "payment_method", "deleted": True}

    async def sweep_expired_cvcs(self) -> int:
        destroyed = await self.store.destroy_expired_cvcs(int(time.time()))
        if destroyed:
            await self.audit.record(
                "cvc.destroyed", actor="sweeper", detail={"count": destroyed, "reason": "expired"}
            )
        return destroyed

    # -- helpers -------------------------------------------------------------------------

    async def _open_name(self, caller: Caller, record: PaymentMethodRecord) -> str | None:
        if record.name_ct is None:
            return None
        key = await self.keys.for_decryption(record.data_key_id, "pan")
        try:
            plain = crypto.open_(key, record.name_ct, sealing_context(caller, record.id, "name"))
        except crypto.InvalidCiphertext as exc:
            # Stored ciphertext that fails authentication was altered or moved: a
            # security event, not a client error.
            _log.error("stored card data failed authentication", payment_method=record.id)
            raise APIError() from exc
        return plain.decode("utf-8")

    @staticmethod
    def _render(
        record: PaymentMethodRecord, *, name: str | None, display_brand: str | None = None
    ) -> dict[str, Any]:
        raw_address = record.billing_details.get("address")
        address: dict[str, Any] = raw_address if isinstance(raw_address, dict) else {}
        return {
            "id": record.id,
            "object": "payment_method",
            "type": "card",
            "created": record.created,
            "livemode": record.livemode,
            "metadata": record.metadata,
            "customer": None,
            "billing_details": {
                "address": {k: address.get(k) for k in _ADDRESS_FIELDS},
                "email": record.billing_details.get("email"),
                "name": name,
                "phone": record.billing_details.get("phone"),
            },
            "card": {
                "brand": record.brand,
                "display_brand": display_brand or brand_info(record.brand).display_brand,
                "last4": record.last4,
                "exp_month": record.exp_month,
                "exp_year": record.exp_year,
                "funding": record.funding,
                "fingerprint": record.fingerprint,
                "country": None,
                "checks": {
                    "cvc_check": record.cvc_check,
                    "address_line1_check": None,
                    "address_postal_code_check": None,
                },
                "wallet": None,
                "three_d_secure_usage": {"supported": True},
            },
        }
