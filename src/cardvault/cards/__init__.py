"""Pure card logic: the card-number type, Luhn, brands, masking. No I/O here."""

from __future__ import annotations

from cardvault.cards.luhn import find_card_numbers, luhn_valid, redact_card_numbers

__all__ = ["find_card_numbers", "luhn_valid", "redact_card_numbers"]
