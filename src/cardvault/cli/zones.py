"""The local stack's zones on disk: one directory per zone (mode 0700) with its own
certificate and key, its own copy of the CA certificate, its settings and its database,
so that no file is shared between zones. :func:`prepare` makes (or reuses) them and
returns the stack's description that ``cardvault up`` writes to ``stack.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cardvault.files import write_private
from cardvault.transport.certs import CA_CERT_FILE, CertificateAuthority, init_ca, load_ca

__all__ = ["acquirer_entry", "prepare", "shop_entry", "shop_origin"]


def _zone_dir(state: Path, zone: str) -> Path:
    path = state / zone
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _issue_once(ca: Any, name: str, out_dir: Path, **kwargs: Any) -> None:
    """Issue ``name`` if it is not there yet, and reissue it (same names, a new key)
    when it has fewer than 30 days left or another CA issued it: every start of the
    stack renews what is due."""
    path = out_dir / f"{name}.pem"
    if not path.exists():
        ca.issue(name, out_dir=out_dir, **kwargs)
    else:
        ca.renew_if_due(path)


def _example_entry(name: str) -> Path | None:
    entry = Path(__file__).resolve().parents[3] / "examples" / name / "__main__.py"
    return entry if entry.exists() else None


def acquirer_entry() -> Path | None:
    """The simulated acquirer's entry point, when cardvault runs from its repository."""
    return _example_entry("acquirer")


def shop_entry() -> Path | None:
    """The example shop's entry point, when cardvault runs from its repository."""
    return _example_entry("shop")


def shop_origin(shop_port: int) -> str:
    """The shop's origin: the demo account's card element may be framed there only."""
    return f"https://localhost:{shop_port}"


def _issue_local(ca: CertificateAuthority, name: str, out_dir: Path, **kwargs: Any) -> None:
    """Issue ``name`` once, as a server certificate for this machine's names."""
    _issue_once(ca, name, out_dir, dns=["localhost"], ips=["127.0.0.1", "::1"], **kwargs)


def _identity(zone_dir: Path, name: str) -> dict[str, str]:
    """The ``{"cert", "key"}`` paths of certificate ``name`` in ``zone_dir``."""
    return {"cert": str(zone_dir / f"{name}.pem"), "key": str(zone_dir / f"{name}.key")}


def _forward_url(acquirer_port: int) -> str:
    """The simulated acquirer's URL: the only destination of the vault's allowlist."""
    return f"https://localhost:{acquirer_port}/v1/authorizations"


def _prepare_ca(state: Path) -> tuple[CertificateAuthority, bytes]:
    """The stack's CA (created on first run) and its certificate, copied to every zone."""
    ca_dir = _zone_dir(state, "ca")
    ca = load_ca(ca_dir) if (ca_dir / CA_CERT_FILE).exists() else init_ca(ca_dir)
    return ca, (ca_dir / CA_CERT_FILE).read_bytes()


def _prepare_keyservice(
    state: Path, ca: CertificateAuthority, ca_pem: bytes, *, keyservice_port: int
) -> dict[str, str]:
    """The key service's zone: its certificate and settings. Its ``stack.json`` entry."""
    kdir = _zone_dir(state, "keyservice")
    _issue_local(ca, "keyservice", kdir)
    write_private(kdir / CA_CERT_FILE, ca_pem)
    write_private(
        kdir / "keyservice.toml",
        (
            'profile = "development"\n\n[server]\n'
            f'host = "127.0.0.1"\nport = {keyservice_port}\n'
            f'cert_file = "{kdir / "keyservice.pem"}"\nkey_file = "{kdir / "keyservice.key"}"\n'
            f'client_ca_file = "{kdir / CA_CERT_FILE}"\n\n'
            f'[store]\nurl = "sqlite:///{kdir / "keyservice.db"}"\n\n'
            f'[seal]\ntype = "dev"\ndev_key_file = "{kdir / "root.key"}"\n'
        ).encode(),
    )
    return {
        "url": f"https://localhost:{keyservice_port}",
        "config": str(kdir / "keyservice.toml"),
        "log": str(kdir / "keyservice.log"),
    }


def _prepare_vault(
    state: Path,
    ca: CertificateAuthority,
    ca_pem: bytes,
    *,
    vault_port: int,
    redirect_port: int,
    admin_port: int,
    keyservice_port: int,
    forward_url: str,
    database_url: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """The vault's zone: its certificate (server, and client identity "vault" for the key
    service), its forwarding allowlist and settings. Its ``stack.json`` entry.

    Its store is SQLite in the zone, or the PostgreSQL database at ``database_url``
    (``cardvault up --database-url``), served by ``workers`` processes (each with its
    own audit log in ``<zone>/w<i>/``). Shared rate limits (``[limits]``) are added by
    ``cardvault up --redis-url`` after this file is written."""
    vdir = _zone_dir(state, "vault")
    store_url = database_url or f"sqlite:///{vdir / 'vault.db'}"
    # With PostgreSQL the audit log stays where the SQLite store would keep it: the zone.
    audit = "" if database_url is None else f'[audit]\ndirectory = "{vdir}"\n\n'
    workers_line = f"workers = {workers}\n" if workers != 1 else ""
    _issue_local(ca, "vault", vdir, client_identity="vault")
    write_private(vdir / CA_CERT_FILE, ca_pem)
    write_private(
        vdir / "allowlist.toml",
        (
            "# The local stack's forwarding allowlist: only the simulated acquirer.\n"
            "[[destination]]\n"
            'name = "acquirer"\n'
            f'url = "{forward_url}"\n'
            'methods = ["POST"]\n'
            'replacements = ["card_number", "card_expiry", "card_cvc", "cardholder_name"]\n'
            'accounts = ["*"]\n'
            f'ca_file = "{vdir / CA_CERT_FILE}"\n'
            "[destination.placements]\n"
            'card_number = { json = "/card/number" }\n'
            'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
            'card_cvc = { json = "/card/cvc" }\n'
            'cardholder_name = { json = "/card/name" }\n'
        ).encode(),
    )
    write_private(
        vdir / "vault.toml",
        (
            'profile = "development"\n\n[server]\n'
            f'host = "127.0.0.1"\nport = {vault_port}\nredirect_port = {redirect_port}\n'
            f"{workers_line}"
            f'cert_file = "{vdir / "vault.pem"}"\nkey_file = "{vdir / "vault.key"}"\n\n'
            f'[admin]\nport = {admin_port}\nclient_ca_file = "{vdir / CA_CERT_FILE}"\n'
            'allowed_identities = ["admin"]\n\n'
            f"[store]\nurl = {json.dumps(store_url)}\n\n{audit}"
            f'[keyservice]\nurl = "https://localhost:{keyservice_port}"\n'
            f'ca_file = "{vdir / CA_CERT_FILE}"\ncert_file = "{vdir / "vault.pem"}"\n'
            f'key_file = "{vdir / "vault.key"}"\n\n'
            f'[forwarding]\nallowlist_file = "{vdir / "allowlist.toml"}"\n\n'
            "# The example shop receives the demo account's events on localhost.\n"
            f'[webhooks]\nallowed_hosts = ["localhost"]\nca_file = "{vdir / CA_CERT_FILE}"\n'
        ).encode(),
    )
    return {
        "url": f"https://localhost:{vault_port}",
        "redirect_url": f"http://localhost:{redirect_port}",
        "admin_url": f"https://localhost:{admin_port}",
        "config": str(vdir / "vault.toml"),
        "log": str(vdir / "vault.log"),
        "store": "sqlite" if database_url is None else "postgresql",
        "workers": workers,
    }


def _prepare_acquirer(
    state: Path, ca: CertificateAuthority, *, acquirer_port: int
) -> dict[str, str]:
    """The simulated acquirer's zone: its server certificate (its settings are command-line
    options). Its ``stack.json`` entry."""
    adir = _zone_dir(state, "acquirer")
    _issue_local(ca, "acquirer", adir)
    return {
        "url": f"https://localhost:{acquirer_port}",
        "forward_url": _forward_url(acquirer_port),
        "state": str(adir / "state"),
        "cert": str(adir / "acquirer.pem"),
        "key": str(adir / "acquirer.key"),
        "log": str(adir / "acquirer.log"),
    }


def _prepare_clients(
    state: Path, ca: CertificateAuthority, ca_pem: bytes
) -> dict[str, dict[str, str]]:
    """The zones "admin" and "shop": each a client certificate of its own identity. Their
    ``stack.json`` identities."""
    zones: dict[str, dict[str, str]] = {}
    for zone in ("admin", "shop"):
        zdir = _zone_dir(state, zone)
        _issue_once(ca, zone, zdir, client_identity=zone)
        write_private(zdir / CA_CERT_FILE, ca_pem)
        zones[zone] = _identity(zdir, zone)
    return zones


def _prepare_shop(
    state: Path, ca: CertificateAuthority, *, shop_port: int, vault_port: int, forward_url: str
) -> dict[str, str]:
    """The example shop's HTTPS certificate and settings, in the shop's zone (made by
    :func:`_prepare_clients`). Its ``stack.json`` entry."""
    # A server certificate only, apart from the shop's client identity "shop" (which no
    # service of ours accepts for anything).
    sdir = state / "shop"
    _issue_local(ca, "shop-server", sdir)
    write_private(
        sdir / "shop.toml",
        (
            "# The example shop's settings, written by `cardvault up`.\n"
            f'[server]\nhost = "127.0.0.1"\nport = {shop_port}\n'
            f'cert_file = "{sdir / "shop-server.pem"}"\nkey_file = "{sdir / "shop-server.key"}"\n'
            f'public_url = "{shop_origin(shop_port)}"\n\n'
            f'[vault]\nurl = "https://localhost:{vault_port}"\nca_file = "{sdir / CA_CERT_FILE}"\n'
            f'keys_file = "{sdir / "keys.json"}"\n\n'
            f'[acquirer]\nforward_url = "{forward_url}"\n\n'
            f'[store]\ndb_file = "{sdir / "shop.db"}"\n\n'
            # Written by `cardvault up` once the vault answers (the endpoint's secret).
            f'[webhooks]\nsecret_file = "{sdir / "webhook.json"}"\n'
        ).encode(),
    )
    return {
        "url": shop_origin(shop_port),
        "dir": str(sdir),
        "config": str(sdir / "shop.toml"),
        "db": str(sdir / "shop.db"),
        "log": str(sdir / "shop.log"),
    }


def prepare(
    state: Path,
    *,
    vault_port: int,
    redirect_port: int,
    admin_port: int,
    keyservice_port: int,
    acquirer_port: int = 8445,
    shop_port: int = 8446,
    database_url: str | None = None,
    vault_workers: int = 1,
) -> dict[str, Any]:
    """Create (or reuse) certificates, configuration and the demo account under ``state``.
    The vault's store is SQLite unless ``database_url`` (PostgreSQL) is given, and it is
    served by ``vault_workers`` processes.

    Each zone gets its own directory (mode 0700) with its own certificate, key, copy of
    the CA certificate, configuration and database: no file is shared between zones.
    Answers the stack's description (``stack.json``, less the demo keys).
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca, ca_pem = _prepare_ca(state)
    forward_url = _forward_url(acquirer_port)
    keyservice = _prepare_keyservice(state, ca, ca_pem, keyservice_port=keyservice_port)
    vault = _prepare_vault(
        state,
        ca,
        ca_pem,
        vault_port=vault_port,
        redirect_port=redirect_port,
        admin_port=admin_port,
        keyservice_port=keyservice_port,
        forward_url=forward_url,
        database_url=database_url,
        workers=vault_workers,
    )
    acquirer = _prepare_acquirer(state, ca, acquirer_port=acquirer_port)
    clients = _prepare_clients(state, ca, ca_pem)
    shop = _prepare_shop(
        state, ca, shop_port=shop_port, vault_port=vault_port, forward_url=forward_url
    )
    return {
        "state": str(state),
        "ca_bundle": str(state / "shop" / CA_CERT_FILE),
        "vault": vault,
        "acquirer": acquirer,
        "shop": shop,
        "keyservice": keyservice,
        "identities": {"vault": _identity(state / "vault", "vault"), **clients},
    }
