"""The shop's settings: a TOML file, then command-line options, never a secret in argv.

    [server]
    host = "127.0.0.1"
    port = 8446
    cert_file = "shop-server.pem"           # the shop's own HTTPS certificate and key
    key_file = "shop-server.key"
    public_url = "https://localhost:8446"   # its origin, as browsers see it

    [vault]
    url = "https://localhost:8443"
    ca_file = "ca.pem"                      # the CA that signed the vault's certificate
    keys_file = "keys.json"                 # {"publishable": "pk_…", "secret": "sk_…"}, 0600
    # element_integrity = "sha384-…"        # pin cardvault.js; default: ask the vault

    [acquirer]
    forward_url = "https://localhost:8445/v1/authorizations"   # on the vault's allowlist

    [store]
    db_file = "shop.db"                     # SQLite, created 0600 in a 0700 directory

    [webhooks]
    secret_file = "webhook.json"            # {"secret": "whsec_…"}, 0600; optional

Relative paths are relative to the file's directory. The secret key is read from
``keys_file`` only: a key on a command line is visible to every user of the machine
(``ps``) and lands in shell history, so there is no option for it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SettingsError", "ShopSettings", "load_settings"]

_SRI = re.compile(r"sha384-[A-Za-z0-9+/]{64}")


class SettingsError(Exception):
    """A setting is missing or wrong. The message names the setting, never a secret."""


@dataclass(frozen=True)
class ShopSettings:
    cert_file: Path
    key_file: Path
    vault_url: str
    ca_file: Path
    publishable_key: str
    secret_key: str
    forward_url: str
    db_file: Path
    host: str = "127.0.0.1"
    port: int = 8446
    public_url: str = ""
    element_integrity: str | None = None
    #: The vault's webhook signing secret (``whsec_…``); None: no webhooks received.
    webhook_secret: str | None = None

    @property
    def origin(self) -> str:
        return self.public_url or f"https://localhost:{self.port}"

    def __repr__(self) -> str:
        # The secret key never reaches a repr, a log line or a traceback.
        return f"ShopSettings(vault_url={self.vault_url!r}, origin={self.origin!r})"


def _read_webhook_secret(path: Path) -> str | None:
    """The signing secret of ``[webhooks] secret_file``, or None while there is no such
    file (``cardvault up`` writes it once the vault answers)."""
    if not path.exists():
        return None
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise SettingsError(f"webhooks.secret_file {path} is readable by other users: chmod 600 it")
    try:
        secret = json.loads(path.read_text()).get("secret")
    except (OSError, ValueError, AttributeError):
        raise SettingsError('webhooks.secret_file must be JSON with a "secret"') from None
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise SettingsError('webhooks.secret_file needs "secret": a whsec_ secret')
    return secret


def _read_keys(path: Path) -> tuple[str, str]:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read vault.keys_file ({exc.strerror})") from None
    except ValueError:
        raise SettingsError("vault.keys_file is not JSON") from None
    if mode & 0o077:
        raise SettingsError(
            f"vault.keys_file {path} is readable by other users ({oct(mode)}): chmod 600 it"
        )
    if not isinstance(raw, dict):
        raise SettingsError("vault.keys_file must hold a JSON object")
    pk, sk = raw.get("publishable"), raw.get("secret")
    if not isinstance(pk, str) or not pk.startswith(("pk_test_", "pk_live_")):
        raise SettingsError('vault.keys_file needs "publishable": a pk_test_/pk_live_ key')
    if not isinstance(sk, str) or not sk.startswith(("sk_test_", "sk_live_")):
        raise SettingsError('vault.keys_file needs "secret": an sk_test_/sk_live_ key')
    return pk, sk


def load_settings(config: Path | None, overrides: dict[str, Any]) -> ShopSettings:
    """Settings from ``config`` (TOML) with ``overrides`` (non-None command-line values) on
    top. Raises :class:`SettingsError` naming the first missing or invalid setting."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if config is not None:
        try:
            with open(config, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError(f"cannot read {config} ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{config} is not valid TOML: {exc}") from None
        base = config.resolve().parent

    def get(section: str, name: str, default: Any = None) -> Any:
        if overrides.get(name) is not None:
            return overrides[name]
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise SettingsError(f"[{section}] must be a table")
        return table.get(name, default)

    def need(section: str, name: str) -> Any:
        value = get(section, name)
        if value in (None, ""):
            raise SettingsError(f"missing setting {section}.{name}")
        return value

    def path(section: str, name: str) -> Path:
        p = Path(str(need(section, name))).expanduser()
        return p if p.is_absolute() else base / p

    vault_url = str(need("vault", "url")).rstrip("/")
    forward_url = str(need("acquirer", "forward_url"))
    for name, url in (("vault.url", vault_url), ("acquirer.forward_url", forward_url)):
        if not url.startswith("https://"):
            raise SettingsError(f"{name} must be an https:// URL")
    integrity = get("vault", "element_integrity")
    if integrity is not None and not _SRI.fullmatch(str(integrity)):
        raise SettingsError("vault.element_integrity must be sha384-<base64>")
    public_url = str(get("server", "public_url", "") or "").rstrip("/")
    if public_url and not public_url.startswith("https://"):
        raise SettingsError("server.public_url must be an https:// origin")
    try:
        port = int(get("server", "port", 8446))
    except (TypeError, ValueError):
        raise SettingsError("server.port must be a number") from None
    pk, sk = _read_keys(path("vault", "keys_file"))
    webhook_secret = None
    if get("webhooks", "secret_file") not in (None, ""):
        webhook_secret = _read_webhook_secret(path("webhooks", "secret_file"))
    return ShopSettings(
        host=str(get("server", "host", "127.0.0.1")),
        port=port,
        public_url=public_url,
        cert_file=path("server", "cert_file"),
        key_file=path("server", "key_file"),
        vault_url=vault_url,
        ca_file=path("vault", "ca_file"),
        publishable_key=pk,
        secret_key=sk,
        element_integrity=str(integrity) if integrity is not None else None,
        forward_url=forward_url,
        db_file=path("store", "db_file"),
        webhook_secret=webhook_secret,
    )


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) mode 0700, and make it 0700 if it existed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
