"""Card brands: which network issued a number, how long its numbers and CVCs are.

Brand detection reads only the issuer identification number (IIN, the leading digits),
never the rest of the card number, so this module works on the BIN alone and needs no
secret input.

Ranges follow the networks' published IIN ranges, in the shape Stripe's client libraries
(stripe-js, stripe-android, stripe-ios) use to guess a brand while a customer types:

=========== =============================================== =============== =====
brand       IIN prefixes                                    lengths         CVC
=========== =============================================== =============== =====
visa        4                                               13, 16, 19      3
mastercard  51-55, 2221-2720                                16              3
amex        34, 37                                          15              4
discover    6011, 644-649, 65                               16-19           3
diners      300-305, 309, 36, 38-39                         14-19           3
jcb         3528-3589                                       16-19           3
unionpay    62, 81                                          16-19           3
unknown     anything else                                   13-19           3 or 4
=========== =============================================== =============== =====

Decisions worth knowing:

* 622126-622925 is China UnionPay's range that Discover also accepts (a network
  alliance, not a Discover card). It is detected as ``unionpay``, as Stripe's client
  libraries do, so every ``62`` number has one brand.
* ``309`` is Diners Club International's range that Stripe's client libraries also
  list; it is included beside the 300-305 range.
* An unknown brand is accepted with 13 to 19 digits. 13 is the shortest number the log
  scrubber (:mod:`cardvault.cards.luhn`) recognises, and every length accepted here must
  be one the scrubber can find, so that no accepted number can slip through a log line.

Funding (credit, debit, prepaid) cannot be derived from the IIN without a BIN table,
and there is no public one. :mod:`cardvault.cards.testcards` knows the funding of the
published test cards; for every other number it is ``unknown``. A deployment that
licenses a BIN table can plug it in where :attr:`CardNumber.funding` is computed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "BRAND_INFO",
    "Brand",
    "BrandInfo",
    "Funding",
    "brand_info",
    "detect_brand",
]


class Brand(enum.StrEnum):
    """Stripe's ``card.brand`` values for the networks we recognise."""

    VISA = "visa"
    MASTERCARD = "mastercard"
    AMEX = "amex"
    DISCOVER = "discover"
    DINERS = "diners"
    JCB = "jcb"
    UNIONPAY = "unionpay"
    UNKNOWN = "unknown"


class Funding(enum.StrEnum):
    """Stripe's ``card.funding`` values."""

    CREDIT = "credit"
    DEBIT = "debit"
    PREPAID = "prepaid"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class BrandInfo:
    """What we know about one brand.

    ``display_brand`` is Stripe's ``card.display_brand`` value (Stripe spells the
    networks out there: ``american_express``, ``diners_club``, ``union_pay``, and uses
    ``other`` where ``brand`` says ``unknown``).
    """

    brand: Brand
    display_brand: str
    lengths: frozenset[int]
    cvc_lengths: frozenset[int]


BRAND_INFO: dict[Brand, BrandInfo] = {
    info.brand: info
    for info in (
        BrandInfo(Brand.VISA, "visa", frozenset({13, 16, 19}), frozenset({3})),
        BrandInfo(Brand.MASTERCARD, "mastercard", frozenset({16}), frozenset({3})),
        BrandInfo(Brand.AMEX, "american_express", frozenset({15}), frozenset({4})),
        BrandInfo(Brand.DISCOVER, "discover", frozenset(range(16, 20)), frozenset({3})),
        BrandInfo(Brand.DINERS, "diners_club", frozenset(range(14, 20)), frozenset({3})),
        BrandInfo(Brand.JCB, "jcb", frozenset(range(16, 20)), frozenset({3})),
        BrandInfo(Brand.UNIONPAY, "union_pay", frozenset(range(16, 20)), frozenset({3})),
        BrandInfo(Brand.UNKNOWN, "other", frozenset(range(13, 20)), frozenset({3, 4})),
    )
}

# (first, last, brand) over prefixes of the same number of digits, inclusive. Order
# matters only where ranges nest, and none do: each prefix length is checked on its own.
_RANGES: tuple[tuple[int, int, Brand], ...] = (
    (4, 4, Brand.VISA),
    (51, 55, Brand.MASTERCARD),
    (2221, 2720, Brand.MASTERCARD),
    (34, 34, Brand.AMEX),
    (37, 37, Brand.AMEX),
    (6011, 6011, Brand.DISCOVER),
    (644, 649, Brand.DISCOVER),
    (65, 65, Brand.DISCOVER),
    (300, 305, Brand.DINERS),
    (309, 309, Brand.DINERS),
    (36, 36, Brand.DINERS),
    (38, 39, Brand.DINERS),
    (3528, 3589, Brand.JCB),
    (62, 62, Brand.UNIONPAY),
    (81, 81, Brand.UNIONPAY),
)


def detect_brand(leading_digits: str) -> Brand:
    """The brand whose IIN range holds ``leading_digits`` (ASCII digits; the BIN).

    Four leading digits are enough for every range above; pass the BIN (six digits),
    never the whole card number. Returns :attr:`Brand.UNKNOWN` when no range matches.
    """
    if not leading_digits.isascii() or not leading_digits.isdigit():
        raise ValueError("leading_digits must be ASCII digits")
    for first, last, brand in _RANGES:
        width = len(str(first))
        if len(leading_digits) >= width and first <= int(leading_digits[:width]) <= last:
            return brand
    return Brand.UNKNOWN


def brand_info(brand: str) -> BrandInfo:
    """The :class:`BrandInfo` for a Stripe brand name; ``ValueError`` if unknown to us."""
    return BRAND_INFO[Brand(brand)]
