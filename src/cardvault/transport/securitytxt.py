"""RFC 9116 ``security.txt``, rendered from :class:`~cardvault.config.SecurityTxtSettings`."""

from __future__ import annotations

import datetime as dt

from cardvault.config import SecurityTxtSettings
from cardvault.errors import ConfigurationError

__all__ = ["PATH", "render_security_txt"]

PATH = "/.well-known/security.txt"
# RFC 9116 §2.5.5: "it is RECOMMENDED that the value ... be less than a year into the
# future to avoid staleness."
_MAX_AHEAD = dt.timedelta(days=365)


def render_security_txt(
    settings: SecurityTxtSettings, *, canonical: list[str], now: dt.datetime | None = None
) -> str:
    """The file's text. ``canonical`` is used when the settings name no Canonical URL.

    Raises :class:`ConfigurationError` when the file would be invalid: no contact, a
    non-https web URL, or an expiry in the past or more than a year ahead.
    """
    now = now or dt.datetime.now(dt.UTC)
    expires = settings.expires or now + dt.timedelta(days=settings.expires_days)
    if expires <= now:
        raise ConfigurationError("setting security_txt.expires is in the past")
    if expires - now > _MAX_AHEAD:
        raise ConfigurationError("setting security_txt.expires is more than a year ahead")
    if not settings.contact:
        raise ConfigurationError("setting security_txt.contact needs at least one value")
    for url in [*settings.contact, settings.policy, *(settings.canonical or canonical)]:
        if url.startswith("http:"):
            raise ConfigurationError("security.txt URLs must use https")
    lines = [f"Contact: {c}" for c in settings.contact]
    lines.append(f"Expires: {expires.astimezone(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    if settings.encryption:
        lines.append(f"Encryption: {settings.encryption}")
    if settings.acknowledgments:
        lines.append(f"Acknowledgments: {settings.acknowledgments}")
    lines.append(f"Policy: {settings.policy}")
    lines.append(f"Preferred-Languages: {settings.preferred_languages}")
    lines += [f"Canonical: {c}" for c in (settings.canonical or canonical)]
    return "\n".join(lines) + "\n"
