"""Pure card logic: the card-number type, Luhn, brands, masking. No I/O here.

The one file read is the packaged table of published test cards (``test_cards.json``).
"""

from __future__ import annotations

from cardvault.cards._secret import WipedError
from cardvault.cards.brands import Brand, BrandInfo, Funding, brand_info, detect_brand
from cardvault.cards.errors import CardDataError
from cardvault.cards.luhn import (
    find_card_numbers,
    holds_card_number,
    luhn_valid,
    redact_card_numbers,
)
from cardvault.cards.pan import CardNumber
from cardvault.cards.testcards import (
    TestCardInfo,
    check_card_allowed,
    is_test_card,
    test_card_info,
)
from cardvault.cards.validate import CVC, Expiry, validate_cvc, validate_expiry

__all__ = [
    "CVC",
    "Brand",
    "BrandInfo",
    "CardDataError",
    "CardNumber",
    "Expiry",
    "Funding",
    "TestCardInfo",
    "WipedError",
    "brand_info",
    "check_card_allowed",
    "detect_brand",
    "find_card_numbers",
    "holds_card_number",
    "is_test_card",
    "luhn_valid",
    "redact_card_numbers",
    "test_card_info",
    "validate_cvc",
    "validate_expiry",
]
