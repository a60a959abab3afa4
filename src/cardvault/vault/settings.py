"""The vault's settings (see :mod:`cardvault.config` for how they are read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cardvault.config import ListenerSettings, LoggingSettings, Profile, SecurityTxtSettings

__all__ = ["AdminSettings", "VaultSettings"]


@dataclasses.dataclass
class AdminSettings:
    """The vault's admin API: a separate listener that only accepts mutual TLS."""

    #: 0 turns the admin listener off.
    port: int = 0
    host: str = "127.0.0.1"
    #: The deployment CA whose client certificates are accepted. Required when port != 0.
    client_ca_file: Path | None = None
    #: Identities (``spiffe://cardvault/<identity>``) allowed to use the admin API.
    allowed_identities: list[str] = dataclasses.field(default_factory=lambda: ["admin"])


@dataclasses.dataclass
class VaultSettings:
    #: "production" (the default) or "development", which announces itself at start-up.
    profile: Profile = "production"
    server: ListenerSettings = dataclasses.field(default_factory=ListenerSettings)
    admin: AdminSettings = dataclasses.field(default_factory=AdminSettings)
    security_txt: SecurityTxtSettings = dataclasses.field(default_factory=SecurityTxtSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    #: The public base URL (https://vault.example.com); used for security.txt's Canonical.
    public_url: str = ""
