"""Card code raises its own errors; the vault answers them as its API's, unchanged."""

from __future__ import annotations

import pytest

from cardvault import errors
from cardvault.cards import CardNumber, validate_cvc, validate_expiry
from cardvault.cards import errors as card_errors
from cardvault.vault.payment_methods import card_data_as_api_errors


@pytest.mark.parametrize(
    ("call", "api_error", "code", "param"),
    [
        (lambda: CardNumber.parse(None), errors.ParameterMissing, "parameter_missing", "card[number]"),
        (lambda: CardNumber.parse("4242424242424241"), errors.IncorrectNumber, "incorrect_number", "card[number]"),
        (lambda: CardNumber.parse("4242x"), errors.InvalidNumber, "invalid_number", "card[number]"),
        (lambda: validate_expiry(13, 2034), errors.InvalidExpiryMonth, "invalid_expiry_month", "card[exp_month]"),
        (lambda: validate_expiry(12, "20"), errors.InvalidExpiryYear, "invalid_expiry_year", "card[exp_year]"),
        (lambda: validate_cvc("12", "visa"), errors.InvalidCVC, "invalid_cvc", "card[cvc]"),
    ],
)  # fmt: skip
def test_a_card_error_becomes_the_api_error_of_the_same_code(
    call: object, api_error: type[errors.CardVaultError], code: str, param: str
) -> None:
    with pytest.raises(card_errors.CardDataError) as raw:
        call()  # type: ignore[operator]
    assert not isinstance(raw.value, errors.CardVaultError)
    with pytest.raises(api_error) as answered, card_data_as_api_errors():
        call()  # type: ignore[operator]
    assert answered.value.code == raw.value.code == code
    assert answered.value.param == param
    assert answered.value.message == raw.value.message
    assert answered.value.http_status in (400, 402)
