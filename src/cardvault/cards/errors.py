"""What is wrong with card data: the errors :mod:`cardvault.cards` raises.

No HTTP here. Each error has Stripe's stable ``code`` for the fault
(``incorrect_number``, ``invalid_expiry_month`` …), the parameter it is about (``param``,
``card[number]``: a name, never the value) and a message for the cardholder, written
from constants. The vault maps them onto its API's error tree where it calls card code
(:func:`cardvault.errors.error_class_for` finds the API's class by the code), so the
same card logic can serve a command line, an import job or another API.

::

    CardDataError                  (ValueError)
    ├── ParameterMissing           parameter_missing
    └── CardError                  card_declined   (a test card in live mode …)
        ├── IncorrectNumber        incorrect_number
        ├── InvalidNumber          invalid_number
        ├── InvalidExpiryMonth     invalid_expiry_month
        ├── InvalidExpiryYear      invalid_expiry_year
        ├── ExpiredCard            expired_card
        └── InvalidCVC             invalid_cvc
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CardDataError",
    "CardError",
    "ExpiredCard",
    "IncorrectNumber",
    "InvalidCVC",
    "InvalidExpiryMonth",
    "InvalidExpiryYear",
    "InvalidNumber",
    "ParameterMissing",
]


class CardDataError(ValueError):
    """Card data that cannot be used. ``message`` never holds the caller's input."""

    code: ClassVar[str] = "card_declined"
    default_message: ClassVar[str] = "The card was declined."

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, param={self.param!r})"


class ParameterMissing(CardDataError):
    code = "parameter_missing"
    default_message = "A required parameter is missing."


class CardError(CardDataError):
    """The card itself is at fault (Stripe's ``card_error`` type)."""


class IncorrectNumber(CardError):
    code = "incorrect_number"
    default_message = "Your card number is incorrect."


class InvalidNumber(CardError):
    code = "invalid_number"
    default_message = "Your card number is not a valid card number."


class InvalidExpiryMonth(CardError):
    code = "invalid_expiry_month"
    default_message = "Your card's expiration month is invalid."


class InvalidExpiryYear(CardError):
    code = "invalid_expiry_year"
    default_message = "Your card's expiration year is invalid."


class ExpiredCard(CardError):
    code = "expired_card"
    default_message = "Your card has expired."


class InvalidCVC(CardError):
    code = "invalid_cvc"
    default_message = "Your card's security code is invalid."
