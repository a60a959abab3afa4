from __future__ import annotations

import pytest

from cardvault.cards import Brand, brand_info, detect_brand
from cardvault.cards.luhn import PAN_MAX_DIGITS, PAN_MIN_DIGITS


@pytest.mark.parametrize(
    ("bin_", "brand"),
    [
        ("400000", "visa"),
        ("499999", "visa"),
        ("500000", "unknown"),
        ("510000", "mastercard"),
        ("559999", "mastercard"),
        ("560000", "unknown"),
        ("222099", "unknown"),
        ("222100", "mastercard"),
        ("272099", "mastercard"),
        ("272100", "unknown"),
        ("340000", "amex"),
        ("350000", "unknown"),
        ("370000", "amex"),
        ("601100", "discover"),
        ("601000", "unknown"),
        ("601200", "unknown"),
        ("643999", "unknown"),
        ("644000", "discover"),
        ("649999", "discover"),
        ("650000", "discover"),
        ("300000", "diners"),
        ("305999", "diners"),
        ("306000", "unknown"),
        ("309000", "diners"),
        ("360000", "diners"),
        ("380000", "diners"),
        ("399999", "diners"),
        ("352799", "unknown"),
        ("352800", "jcb"),
        ("358999", "jcb"),
        ("359000", "unknown"),
        ("620000", "unionpay"),
        # China UnionPay's range that Discover also accepts: one brand per 62 number.
        ("622126", "unionpay"),
        ("622925", "unionpay"),
        ("810000", "unionpay"),
        ("820000", "unknown"),
        ("100000", "unknown"),
    ],
)
def test_detect_brand_at_range_edges(bin_: str, brand: str) -> None:
    assert detect_brand(bin_) == brand


@pytest.mark.parametrize("bad", ["٤٢٤٢٤٢", "42424x", "", "4242 4"])
def test_detect_brand_rejects_non_ascii_digits(bad: str) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        detect_brand(bad)


@pytest.mark.parametrize(
    ("brand", "display_brand", "cvc"),
    [
        ("visa", "visa", {3}),
        ("mastercard", "mastercard", {3}),
        ("amex", "american_express", {4}),
        ("discover", "discover", {3}),
        ("diners", "diners_club", {3}),
        ("jcb", "jcb", {3}),
        ("unionpay", "union_pay", {3}),
        ("unknown", "other", {3, 4}),
    ],
)
def test_brand_info_uses_stripe_names(brand: str, display_brand: str, cvc: set[int]) -> None:
    info = brand_info(brand)
    assert info.brand == brand
    assert info.display_brand == display_brand
    assert info.cvc_lengths == cvc


def test_brand_info_rejects_unknown_brand_name() -> None:
    with pytest.raises(ValueError, match="bogus"):
        brand_info("bogus")


def test_every_brand_length_is_one_the_log_scrubber_finds() -> None:
    for brand in Brand:
        lengths = brand_info(brand).lengths
        assert lengths
        assert min(lengths) >= PAN_MIN_DIGITS
        assert max(lengths) <= PAN_MAX_DIGITS


def test_brand_values_are_stripe_brand_strings() -> None:
    assert {b.value for b in Brand} == {
        "visa",
        "mastercard",
        "amex",
        "discover",
        "diners",
        "jcb",
        "unionpay",
        "unknown",
    }
