from __future__ import annotations

import pytest

from cardvault import errors
from cardvault.errors import CardVaultError, error_class_for

STRIPE_TYPES = {
    "api_error",
    "card_error",
    "idempotency_error",
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "rate_limit_error",
}


def all_error_classes() -> list[type[CardVaultError]]:
    return [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, CardVaultError)
    ]


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_has_a_stripe_type_a_code_and_a_status(cls: type[CardVaultError]) -> None:
    assert cls.type in STRIPE_TYPES
    assert cls.code and cls.code.replace("_", "").isalnum()
    assert 400 <= cls.http_status <= 599
    assert cls.__name__ in errors.__doc__  # the tree in the docstring names every class


def test_leaf_codes_are_unique() -> None:
    leaves = [c for c in all_error_classes() if c is not CardVaultError]
    codes = [c.code for c in leaves]
    assert len(codes) == len(set(codes))


def test_every_stripe_type_has_a_branch() -> None:
    assert {c.type for c in all_error_classes()} == STRIPE_TYPES


def test_to_dict_renders_stripes_error_object() -> None:
    exc = errors.IncorrectNumber(param="card[number]")
    assert exc.to_dict() == {
        "error": {
            "type": "card_error",
            "code": "incorrect_number",
            "message": "Your card number is incorrect.",
            "param": "card[number]",
        }
    }
    assert exc.to_dict(request_log_url="https://x/logs/req_1")["error"]["request_log_url"] == (
        "https://x/logs/req_1"
    )
    assert exc.http_status == 402


def test_error_class_for_maps_codes_then_types() -> None:
    assert error_class_for("incorrect_number", "card_error") is errors.IncorrectNumber
    assert error_class_for("keyservice_sealed") is errors.KeyServiceSealed
    assert error_class_for("something_new", "card_error") is errors.CardError
    assert error_class_for(None, "rate_limit_error") is errors.RateLimitError
    assert error_class_for(None, None) is errors.APIError


def test_repr_shows_code_not_message() -> None:
    assert (
        repr(errors.InvalidCVC(param="card[cvc]"))
        == "InvalidCVC(code='invalid_cvc', param='card[cvc]')"
    )
