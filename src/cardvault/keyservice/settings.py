"""The key service's settings (see :mod:`cardvault.config` for how they are read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from cardvault.config import (
    AuditSettings,
    ListenerSettings,
    LoggingSettings,
    Profile,
    SecurityTxtSettings,
    required,
)
from cardvault.transport.selfaudit import TlsAuditSettings

__all__ = ["KeyServiceSettings", "SealSettings", "StoreSettings"]


@dataclasses.dataclass
class StoreSettings:
    #: ``sqlite:///abs/path/keyd.db`` (default store) or ``postgresql://role@host/db``.
    #: The key service's database is its own: never the vault's.
    url: str = required()


@dataclasses.dataclass
class SealSettings:
    #: "shamir" (custodian shares), "pkcs11" (the root key inside an HSM, automatic
    #: unseal at start with the token's PIN) or "dev" (auto-unseal from a local file:
    #: development only, refused in production).
    type: Literal["shamir", "dev", "pkcs11"] = "shamir"
    dev_key_file: Path | None = None
    #: For "pkcs11": the vendor's PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so),
    #: the token's label, and a file (mode 0600) holding the token's user PIN.
    pkcs11_module: Path | None = None
    pkcs11_token_label: str = ""
    pkcs11_pin_file: Path | None = None
    #: Seconds after the first share before partial unseal progress is discarded.
    unseal_timeout: int = 600


@dataclasses.dataclass
class IdentitySettings:
    #: Client-certificate identities that may get, unwrap and derive keys.
    vault: list[str] = dataclasses.field(default_factory=lambda: ["vault"])
    #: Identities that may unseal, seal, rotate, rewrap and configure.
    admin: list[str] = dataclasses.field(default_factory=lambda: ["admin"])


@dataclasses.dataclass
class KeyServiceSettings:
    profile: Profile = "production"
    #: The listener must have ``client_ca_file``: the key service speaks mutual TLS only.
    server: ListenerSettings = dataclasses.field(default_factory=ListenerSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    seal: SealSettings = dataclasses.field(default_factory=SealSettings)
    identities: IdentitySettings = dataclasses.field(default_factory=IdentitySettings)
    security_txt: SecurityTxtSettings = dataclasses.field(default_factory=SecurityTxtSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    audit: AuditSettings = dataclasses.field(default_factory=AuditSettings)
    #: The service's audit of its own TLS, into its audit log (docs/deploy.md).
    tls_audit: TlsAuditSettings = dataclasses.field(default_factory=TlsAuditSettings)
    public_url: str = ""
