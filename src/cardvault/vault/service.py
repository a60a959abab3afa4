"""The vault's operations: accounts and API keys, and PaymentMethods.

A card number enters as a :class:`~cardvault.cards.CardNumber` (a wipeable buffer),
is fingerprinted and sealed under a data key, and is wiped before the response is
built. What is stored: the ciphertext, the data key's id (its wrapped form is stored
separately), and the non-secret facts Stripe returns (brand, last four, expiry,
funding, fingerprint). Associated data binds every ciphertext to its account, mode,
object id and field, so a ciphertext copied into another row does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Literal

from cardvault import crypto
from cardvault.audit.record import untrusted_text
from cardvault.audit.recorder import Recorder
from cardvault.cards import (
    CardNumber,
    brand_info,
    check_card_allowed,
    holds_card_number,
    validate_cvc,
    validate_expiry,
)
from cardvault.errors import (
    APIError,
    AuditUnavailableError,
    AuthenticationError,
    InvalidRequestError,
    ParameterMissing,
    ParameterUnknown,
    PermissionDenied,
    ResourceMissing,
)
from cardvault.logging import bind_request_fields, get_logger
from cardvault.storage.base import (
    Account,
    ApiKey,
    PaymentMethodRecord,
    UnstorableValue,
    VaultStore,
)
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.params import looks_like_id, parse_page

__all__ = ["Caller", "VaultService", "new_id", "time_ordered_id"]

_ALPHABET = string.ascii_letters + string.digits
#: new_id's byte-to-symbol table: byte b becomes _ALPHABET[b % 62]; bytes 248-255 are
#: dropped (_ID_DROP).
_ID_TABLE = bytes(ord(_ALPHABET[b % 62]) for b in range(256))
_ID_DROP = bytes(range(248, 256))
_log = get_logger("cardvault.vault")

# Stripe's limits on metadata, which callers' code already respects.
_METADATA_MAX_KEYS = 50
_METADATA_MAX_KEY = 40
_METADATA_MAX_VALUE = 500
_NAME_MAX = 200
_PM_PARAMS = {"type", "card", "billing_details", "metadata", "expand"}
_CARD_PARAMS = {"number", "exp_month", "exp_year", "cvc"}
_BILLING_PARAMS = {"name", "email", "phone", "address"}
_ADDRESS_PARAMS = {"line1", "line2", "city", "state", "postal_code", "country"}
#: The order Stripe's objects list them in (alphabetical).
_ADDRESS_FIELDS = tuple(sorted(_ADDRESS_PARAMS))


def new_id(prefix: str, length: int = 24) -> str:
    """``prefix`` and ``length`` random letters and digits (62 symbols, uniform).

    One call to the CSPRNG for all the bytes: bytes of 248 and above are dropped so that
    ``b % 62`` stays uniform (248 = 4 × 62)."""
    out = ""
    while len(out) < length:
        out += secrets.token_bytes(length + 8).translate(_ID_TABLE, _ID_DROP).decode("ascii")
    return prefix + out[:length]


#: The time prefix's symbols, in ASCII order, so that ids sort by their time prefix.
_SORTED_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: Symbols of milliseconds since the Unix epoch at the head of a time-ordered id: 62**8
#: milliseconds is about 6,900 years.
_TIME_SYMBOLS = 8
#: Every two symbols, in order: a number below 62**2 = 3844 written with two of them.
_SYMBOL_PAIRS = tuple(a + b for a in _SORTED_ALPHABET for b in _SORTED_ALPHABET)


def time_ordered_id(prefix: str, length: int = 24) -> str:
    """``prefix``, the time in milliseconds (``_TIME_SYMBOLS`` symbols that sort as the
    time does), then random letters and digits (16 of them, about 95 bits, for the
    default ``length``).

    For objects made on every request (payment methods, forwarding requests): a new id
    lands next to the newest ones in the primary-key index, so a commit of a batch of
    rows dirties a page or two of that index instead of one random page per row. On
    this project's benchmark the WAL writes per tokenization fell from about 3 to 1.2. An id
    is not a secret (every lookup is scoped to the caller's account); it tells the
    creation time to the millisecond, which the object's ``created`` tells to the
    second. Ids made in one millisecond, or while the clock steps back, are merely
    unordered among themselves.
    """
    if length <= _TIME_SYMBOLS:
        raise ValueError(f"a time-ordered id needs more than {_TIME_SYMBOLS} symbols")
    ms = time.time_ns() // 1_000_000
    return (
        prefix
        + _SYMBOL_PAIRS[ms // 62**6 % 3844]
        + _SYMBOL_PAIRS[ms // 62**4 % 3844]
        + _SYMBOL_PAIRS[ms // 62**2 % 3844]
        + _SYMBOL_PAIRS[ms % 3844]
        + new_id("", length - _TIME_SYMBOLS)
    )


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: the account, the mode, and what kind of key they used."""

    account_id: str
    mode: Literal["test", "live"]
    kind: Literal["publishable", "secret"]
    key_id: str

    @property
    def livemode(self) -> bool:
        return self.mode == "live"


def _context(caller: Caller, pm_id: str, field: str) -> dict[str, str]:
    return {"account": caller.account_id, "mode": caller.mode, "object": pm_id, "field": field}


#: A parameter name is echoed in an error only when it looks like one of Stripe's names
#: (a word) or a metadata key without a long run of digits: any other name is the
#: caller's text, and may be a card number sent where a name belongs.
_ECHOED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .\-]{0,39}")
_DIGIT_RUN = re.compile(r"[0-9]{7,}")


def _no_such_payment_method(pm_id: str) -> ResourceMissing:
    """Stripe's "No such PaymentMethod: 'pm_…'", naming the id only when it has the shape
    of one of ours: anything else the caller put in the path may be a card number."""
    if looks_like_id(pm_id, "pm_"):
        return ResourceMissing(f"No such PaymentMethod: '{pm_id}'", param="payment_method")
    return ResourceMissing("No such PaymentMethod.", param="payment_method")


def _check_keys(data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    for key in data:
        if key not in allowed:
            text = str(key)
            if not _ECHOED_NAME.fullmatch(text) or _DIGIT_RUN.search(text):
                raise ParameterUnknown(
                    "Received an unknown parameter" + (f" in {prefix}." if prefix else "."),
                    param=prefix or None,
                )
            name = f"{prefix}[{text}]" if prefix else text
            raise ParameterUnknown(f"Received unknown parameter: {name}", param=name)


def _metadata(value: Any) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError("metadata must be a hash of keys to strings.", param="metadata")
    if len(value) > _METADATA_MAX_KEYS:
        raise InvalidRequestError("metadata may have at most 50 keys.", param="metadata")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > _METADATA_MAX_KEY:
            raise InvalidRequestError("metadata keys are 1 to 40 characters.", param="metadata")
        if (
            not isinstance(v, str | int | float)
            or isinstance(v, bool)
            or len(str(v)) > _METADATA_MAX_VALUE
        ):
            raise InvalidRequestError(
                "metadata values are strings of at most 500 characters.", param=f"metadata[{k}]"
            )
        out[k] = str(v)
    # Metadata is stored in the clear: refuse values that hold a card number.
    for k, v in out.items():
        if holds_card_number(f"{k} {v}"):
            raise InvalidRequestError("metadata must not contain card numbers.", param="metadata")
    return out


#: The longest billing detail other than the name that is kept (email, phone, and each
#: address field).
_BILLING_MAX = 500


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


class VaultService:
    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        *,
        cvc_ttl: int = 3600,
        audit: Recorder | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.cvc_ttl = cvc_ttl
        self.audit = audit or Recorder(None)
        self._key_cache: dict[str, tuple[ApiKey | None, float]] = {}

    # -- accounts and API keys -----------------------------------------------------------

    async def create_account(self, name: str) -> Account:
        account = Account(new_id("acct_", 16), name, int(time.time()))
        await self.store.create_account(account)
        await self.audit.record("account.created", actor="cli", object_id=account.id)
        return account

    async def create_api_key(
        self, account_id: str, kind: Literal["publishable", "secret"], mode: Literal["test", "live"]
    ) -> tuple[ApiKey, str]:
        """A new key: the record and the key itself, which is shown once and never stored."""
        if await self.store.get_account(account_id) is None:
            raise ResourceMissing("No such account.")
        prefix = {"publishable": "pk", "secret": "sk"}[kind]
        secret = f"{prefix}_{mode}_" + "".join(secrets.choice(_ALPHABET) for _ in range(40))
        record = ApiKey(
            id=new_id("key_", 16),
            account_id=account_id,
            kind=kind,
            mode=mode,
            prefix=secret[:12],
            hash=hash_api_key(secret),
            created=int(time.time()),
        )
        await self.store.create_api_key(record)
        await self.audit.record(
            "api_key.created",
            actor="cli",
            object_id=record.id,
            detail={"account": account_id, "kind": kind, "mode": mode},
        )
        return record, secret

    async def revoke_api_key(self, key_id: str) -> bool:
        done = await self.store.revoke_api_key(key_id, int(time.time()))
        self._key_cache.clear()
        # The id is the operator's text: an operator who pastes the key itself (or
        # anything else) must get an audit record, not a refusal to write one.
        await self.audit.record(
            "api_key.revoked",
            actor="cli",
            object_id=key_id if looks_like_id(key_id, "key_") else untrusted_text(key_id),
            result="ok" if done else "not_found",
        )
        return done

    async def authenticate(self, presented: str | None) -> Caller:
        """The caller behind an API key. 401 for a missing, malformed, unknown or revoked key.

        Lookups are cached for two seconds: a revoked key stops working within that time.
        """
        if not presented:
            await self._auth_failed("missing")
            raise AuthenticationError(
                "You did not provide an API key. Provide it as a Bearer token in the Authorization header."
            )
        if (
            not presented.startswith(("sk_test_", "sk_live_", "pk_test_", "pk_live_"))
            or len(presented) > 200
        ):
            await self._auth_failed("malformed")
            raise AuthenticationError()
        digest = hash_api_key(presented)
        now = time.monotonic()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[1] > now:
            record = cached[0]
        else:
            record = await self.store.find_api_key(digest)
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[digest] = (record, now + 2.0)
        if (
            record is None
            or record.revoked is not None
            or not hmac.compare_digest(record.hash, digest)
        ):
            # The presented key is a secret even when wrong: only its kind is recorded,
            # and the key id when it is a known (revoked) key.
            await self._auth_failed(
                "revoked" if record is not None else "unknown",
                presented[:7].rstrip("_"),
                record.id if record is not None else None,
            )
            raise AuthenticationError()
        return Caller(record.account_id, record.mode, record.kind, record.id)

    # -- payment methods -----------------------------------------------------------------

    async def create_payment_method(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        _check_keys(params, _PM_PARAMS)
        if params.get("type") in (None, ""):
            raise ParameterMissing("Missing required param: type.", param="type")
        if params["type"] != "card":
            raise InvalidRequestError("Only type=card is supported.", param="type")
        card = params.get("card")
        if card in (None, ""):
            raise ParameterMissing("Missing required param: card.", param="card")
        if not isinstance(card, dict):
            raise InvalidRequestError("card must be a hash.", param="card")
        _check_keys(card, _CARD_PARAMS, "card")
        billing = params.get("billing_details") or {}
        if not isinstance(billing, dict):
            raise InvalidRequestError("billing_details must be a hash.", param="billing_details")
        _check_keys(billing, _BILLING_PARAMS, "billing_details")
        address = billing.get("address") or {}
        if not isinstance(address, dict):
            raise InvalidRequestError("address must be a hash.", param="billing_details[address]")
        _check_keys(address, _ADDRESS_PARAMS, "billing_details[address]")
        metadata = _metadata(params.get("metadata"))
        other_billing = _billing_details(billing, address)
        name = billing.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > _NAME_MAX):
            raise InvalidRequestError(
                "billing_details[name] must be a string.", param="billing_details[name]"
            )

        number = CardNumber.parse(card.get("number"))
        cvc = None
        try:
            expiry = validate_expiry(card.get("exp_month"), card.get("exp_year"))
            check_card_allowed(number, livemode=caller.livemode)
            if card.get("cvc") not in (None, ""):
                cvc = validate_cvc(card.get("cvc"), number.brand)
            pm_id = time_ordered_id("pm_")
            account_key = await self.keys.account_key(caller.account_id)
            fingerprint = crypto.fingerprint(account_key, number.digits_for_crypto())
            dk_id, dk = await self.keys.for_encryption("pan")
            number_ct = crypto.seal(
                dk, number.digits_for_crypto(), _context(caller, pm_id, "number")
            )
            name_ct = (
                crypto.seal(dk, name.encode("utf-8"), _context(caller, pm_id, "name"))
                if name
                else None
            )
            cvc_ct = cvc_dk_id = cvc_expires = None
            if cvc is not None:
                cvc_dk_id, cvc_dk = await self.keys.for_encryption("cvc")
                cvc_ct = crypto.seal(
                    cvc_dk, cvc.digits_for_crypto(), _context(caller, pm_id, "cvc")
                )
                cvc_expires = int(time.time()) + self.cvc_ttl
            record = PaymentMethodRecord(
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
                metadata=metadata,
                billing_details=other_billing,
                cvc_ct=cvc_ct,
                cvc_data_key_id=cvc_dk_id,
                cvc_expires=cvc_expires,
                cvc_check="unchecked" if cvc is not None else None,
            )
            display_brand = number.display_brand
        finally:
            number.wipe()
            if cvc is not None:
                cvc.wipe()
        try:
            await self.store.insert_payment_method(record)
        except UnstorableValue as exc:
            # The parser refuses such text first; this is the net under it.
            raise InvalidRequestError("A parameter holds text that cannot be stored.") from exc
        try:
            await self.audit.record(
                "payment_method.created",
                actor=caller.key_id,
                object_id=pm_id,
                detail={
                    "livemode": caller.livemode,
                    "brand": record.brand,
                },
            )
        except AuditUnavailableError:
            # Fail closed: a card whose creation cannot be recorded is not kept.
            await self.store.delete_payment_method(caller.account_id, caller.livemode, pm_id)
            raise
        # On the request's access line rather than a line of its own: one line per
        # request is a measurable share of a tokenization's cost.
        bind_request_fields(payment_method=pm_id, key=caller.key_id, livemode=caller.livemode)
        return self._render(record, name=name, display_brand=display_brand)

    async def retrieve_payment_method(self, caller: Caller, pm_id: str) -> dict[str, Any]:
        self._require_secret(caller)
        record = await self._get(caller, pm_id)
        name = await self._open_name(caller, record)
        await self.audit.record("payment_method.read", actor=caller.key_id, object_id=pm_id)
        return self._render(record, name=name)

    async def list_payment_methods(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        self._require_secret(caller)
        _check_keys(query, {"limit", "starting_after", "ending_before", "type", "expand"})
        page = parse_page(query, "pm_")
        records = await self.store.list_payment_methods(
            caller.account_id,
            caller.livemode,
            limit=page.limit + 1,
            starting_after=page.starting_after,
            ending_before=page.ending_before,
        )
        limit, before = page.limit, page.ending_before
        has_more = len(records) > limit
        records = records[1:] if (has_more and before) else records[:limit]
        data = [self._render(r, name=await self._open_name(caller, r)) for r in records]
        await self.audit.record(
            "payment_method.listed", actor=caller.key_id, detail={"count": len(data)}
        )
        return {"object": "list", "url": "/v1/payment_methods", "has_more": has_more, "data": data}

    async def delete_payment_method(self, caller: Caller, pm_id: str) -> dict[str, Any]:
        self._require_secret(caller)
        await self._get(caller, pm_id)
        # Recorded first: if the record cannot be written, nothing is deleted.
        await self.audit.record("payment_method.deleted", actor=caller.key_id, object_id=pm_id)
        if not await self.store.delete_payment_method(caller.account_id, caller.livemode, pm_id):
            raise _no_such_payment_method(pm_id)
        return {"id": pm_id, "object": "payment_method", "deleted": True}

    async def sweep_expired_cvcs(self) -> int:
        destroyed = await self.store.destroy_expired_cvcs(int(time.time()))
        if destroyed:
            await self.audit.record(
                "cvc.destroyed", actor="sweeper", detail={"count": destroyed, "reason": "expired"}
            )
        return destroyed

    async def _auth_failed(
        self, reason: str, kind: str | None = None, key_id: str | None = None
    ) -> None:
        detail: dict[str, str | None] = {"reason": reason, "key_kind": kind}
        await self.audit.record(
            "auth.failed", actor=key_id or "anonymous", result="refused", detail=detail
        )

    # -- helpers -------------------------------------------------------------------------

    async def _open_name(self, caller: Caller, record: PaymentMethodRecord) -> str | None:
        if record.name_ct is None:
            return None
        key = await self.keys.for_decryption(record.data_key_id, "pan")
        try:
            plain = crypto.open_(key, record.name_ct, _context(caller, record.id, "name"))
        except crypto.InvalidCiphertext as exc:
            # Stored ciphertext that fails authentication was altered or moved: a
            # security event, not a client error.
            _log.error("stored card data failed authentication", payment_method=record.id)
            raise APIError() from exc
        return plain.decode("utf-8")

    @staticmethod
    def _require_secret(caller: Caller) -> None:
        if caller.kind != "secret":
            raise PermissionDenied(
                "Publishable keys can only create payment methods. Use a secret key for this request."
            )

    async def _get(self, caller: Caller, pm_id: str) -> PaymentMethodRecord:
        record = None
        if looks_like_id(pm_id, "pm_"):
            record = await self.store.get_payment_method(caller.account_id, caller.livemode, pm_id)
        if record is None:
            raise _no_such_payment_method(pm_id)
        return record

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
