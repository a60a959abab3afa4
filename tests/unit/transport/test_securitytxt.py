from __future__ import annotations

import datetime as dt

import pytest
import sectxt

from cardvault.config import SecurityTxtSettings
from cardvault.errors import ConfigurationError
from cardvault.transport.securitytxt import render_security_txt

URL = "https://vault.example.com/.well-known/security.txt"
NOW = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)


def test_rendered_file_is_valid_rfc_9116() -> None:
    text = render_security_txt(
        SecurityTxtSettings(
            contact=["mailto:security@example.com"], policy="https://example.com/p"
        ),
        canonical=[URL],
    )
    parser = sectxt.Parser(text.encode(), urls=URL)
    assert parser.is_valid(), parser.errors


def test_default_expiry_is_180_days_after_start() -> None:
    text = render_security_txt(SecurityTxtSettings(), canonical=[URL], now=NOW)
    assert "Expires: 2027-05-28T00:00:00Z" in text


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (SecurityTxtSettings(expires=NOW - dt.timedelta(days=1)), "past"),
        (SecurityTxtSettings(expires=NOW + dt.timedelta(days=400)), "year"),
        (SecurityTxtSettings(contact=[]), "contact"),
        (SecurityTxtSettings(policy="http://example.com/p"), "https"),
    ],
)
def test_invalid_settings_are_refused(settings: SecurityTxtSettings, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        render_security_txt(settings, canonical=[URL], now=NOW)
