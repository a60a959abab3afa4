"""What the simulated acquirer answers: request validation and the authorization rules.

Validation (a failure is ``400 invalid_request_error``; the message names the
parameter, never its value):

* ``amount``: a positive integer (in the currency's minor unit), at most 99,999,999;
  a form body gives it as ASCII digits.
* ``currency``: three ASCII letters (answered in lower case).
* ``card``: an object with ``number`` (string or integer), ``exp_month`` and
  ``exp_year`` (integer or string); ``cvc`` is a string or absent.
* ``reference``: optional, a string of at most 500 characters.
* Other parameters are ignored.

Authorization rules, checked in this order (the first that applies wins; a decline is
``402`` with ``status: "declined"`` and a ``decline_code``):

1. the number is not ASCII digits with optional single spaces or dashes between them:
   ``invalid_number``; wrong length for its brand, leading zero or failed Luhn check:
   ``incorrect_number`` (the card-number grammar of :mod:`cardvault.cards.pan`);
2. the expiry month or year is not a month (1-12) or a 2- or 4-digit year:
   ``invalid_expiry_month`` / ``invalid_expiry_year``; the card expired (it is valid
   through the last day of its expiry month, UTC): ``expired_card``;
3. the CVC is missing or empty: ``incorrect_cvc``; it has the wrong length for the
   brand or is not digits: ``incorrect_cvc`` too (an issuer would say it does not match);
4. a published test card (``test_cards.json``) with an ``outcome``: declined with that
   outcome as the decline code;
5. anything else, a published test card without outcome or any other Luhn-valid number
   (live-mode simulation): approved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cardvault.cards import CardNumber, test_card_info, validate_cvc
from cardvault.cards import errors as card_errors
from cardvault.errors import InvalidRequestError, ParameterMissing

__all__ = ["MAX_AMOUNT", "AuthorizationRequest", "Decision", "decide", "parse_request"]

MAX_AMOUNT = 99_999_999
MAX_REFERENCE = 500


@dataclass(frozen=True, slots=True, repr=False)
class AuthorizationRequest:
    """A request that passed validation. ``number`` and ``cvc`` are as received.

    ``repr`` is disabled: the default one would print the card number and the CVC.
    """

    amount: int
    currency: str
    reference: str | None
    number: str | int
    exp_month: str | int
    exp_year: str | int
    cvc: str | None

    def __repr__(self) -> str:
        return f"AuthorizationRequest(amount={self.amount}, currency={self.currency!r})"


@dataclass(frozen=True, slots=True)
class Decision:
    """The acquirer's answer. ``brand``, ``last4`` and ``funding`` are ``None`` when the
    number could not be read as a card number."""

    status: Literal["approved", "declined"]
    decline_code: str | None
    brand: str | None = None
    last4: str | None = None
    funding: str | None = None

    @property
    def approved(self) -> bool:
        return self.status == "approved"


def _missing(param: str) -> ParameterMissing:
    return ParameterMissing(f"Missing required param: {param}.", param=param)


def _invalid(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid {param}: must be {what}.", param=param)


def _is_ascii_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _amount(value: object) -> int:
    if value is None or value == "":
        raise _missing("amount")
    if isinstance(value, str) and _is_ascii_digits(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AMOUNT:
        raise _invalid("amount", f"an integer from 1 to {MAX_AMOUNT}")
    return value


def _currency(value: object) -> str:
    if value is None or value == "":
        raise _missing("currency")
    if not (isinstance(value, str) and len(value) == 3 and value.isascii() and value.isalpha()):
        raise _invalid("currency", "a three-letter ISO currency code")
    return value.lower()


def _int_or_str(value: object, param: str) -> str | int:
    if value is None or (isinstance(value, str) and not value.strip(" ")):
        raise _missing(param)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _invalid(param, "a string or an integer")
    return value


def parse_request(data: Mapping[str, Any]) -> AuthorizationRequest:
    """Validate a decoded body (JSON object or nested form). Raises :class:`InvalidRequestError`."""
    amount = _amount(data.get("amount"))
    currency = _currency(data.get("currency"))
    reference = data.get("reference")
    if reference is not None and (not isinstance(reference, str) or len(reference) > MAX_REFERENCE):
        raise _invalid("reference", f"a string of at most {MAX_REFERENCE} characters")
    card = data.get("card")
    if card is None or card == "":
        raise _missing("card")
    if not isinstance(card, Mapping):
        raise _invalid("card", "an object")
    number = _int_or_str(card.get("number"), "card[number]")
    exp_month = _int_or_str(card.get("exp_month"), "card[exp_month]")
    exp_year = _int_or_str(card.get("exp_year"), "card[exp_year]")
    cvc = card.get("cvc")
    if cvc is not None and not isinstance(cvc, str):
        raise _invalid("card[cvc]", "a string")
    return AuthorizationRequest(
        amount=amount,
        currency=currency,
        reference=reference,
        number=number,
        exp_month=exp_month,
        exp_year=exp_year,
        cvc=cvc,
    )


def _month(value: str | int) -> int | None:
    if isinstance(value, str):
        text = value.strip(" ")
        if not (_is_ascii_digits(text) and len(text) in (1, 2)):
            return None
        value = int(text)
    return value if 1 <= value <= 12 else None


def _year(value: str | int) -> int | None:
    if isinstance(value, str):
        text = value.strip(" ")
        if not (_is_ascii_digits(text) and len(text) in (2, 4)):
            return None
        year = int(text)
        return 2000 + year if len(text) == 2 else year
    if 0 <= value <= 99:
        return 2000 + value
    return value if 1000 <= value <= 9999 else None


def _declined(code: str, card: CardNumber | None = None) -> Decision:
    if card is None:
        return Decision("declined", code)
    return Decision("declined", code, card.brand.value, card.last4, card.funding.value)


def decide(request: AuthorizationRequest, *, now: datetime | None = None) -> Decision:
    """Apply the rules of the module docstring. The card's digits are wiped on return."""
    now = now or datetime.now(UTC)
    try:
        card = CardNumber.parse(request.number)
    except card_errors.InvalidNumber:
        return _declined("invalid_number")
    except (card_errors.IncorrectNumber, card_errors.ParameterMissing):
        return _declined("incorrect_number")
    with card:
        month, year = _month(request.exp_month), _year(request.exp_year)
        if month is None:
            return _declined("invalid_expiry_month", card)
        if year is None:
            return _declined("invalid_expiry_year", card)
        if (year, month) < (now.year, now.month):
            return _declined("expired_card", card)
        try:
            validate_cvc(request.cvc, card.brand.value).wipe()
        except (card_errors.ParameterMissing, card_errors.InvalidCVC):
            return _declined("incorrect_cvc", card)
        known = test_card_info(card)
        if known is not None and known.outcome is not None:
            return _declined(known.outcome, card)
        return Decision("approved", None, card.brand.value, card.last4, card.funding.value)
