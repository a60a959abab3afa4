"""Command line of the example shop: settings, the vault's SRI hash, TLS, serve.

The shop's listener is cardvault's shared transport: its TLS context comes from
:func:`cardvault.transport.tls.server_context` (Mozilla's intermediate profile: no X448
or secp521r1, no session tickets), and it is served by
:func:`cardvault.transport.server.run_until_stopped`, so it gets the same connection and
request limits as every cardvault listener (docs/transport.md, "Limits").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from cardvault.client import CardVaultError, Client, TransportError
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context

from .app import ShopApp, build_shop_app
from .orders import OrderStore
from .payments import Payments
from .settings import SettingsError, ShopSettings, load_settings
from .webhooks import WebhookInbox

__all__ = ["main", "parser"]

_log = logging.getLogger("shop")

#: How long start-up waits for the vault to answer with cardvault.js's hash.
STARTUP_WAIT = 30.0

_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: a traceback's text can carry values from any frame.
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, default=str)


def log_transport_events_as_json() -> None:
    """The shared transport logs with structlog (its refusals: ``request_refused`` with
    ``limit=`` and ``client=``). Hand those lines to the standard library, so that they
    are written by :class:`JsonFormatter` like the shop's own."""
    structlog.configure(
        processors=[structlog.stdlib.render_to_log_kwargs],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.shop",
        description=(
            "Example shop for cardvault: a checkout with the vault's card element; pays by "
            "asking the vault to forward the card to the acquirer; keeps only pm_ ids. "
            "Settings come from --config (TOML) with these options on top. The secret key "
            "is read from the keys file only, never from the command line."
        ),
    )
    p.add_argument("--config", type=Path, help="the shop's TOML settings")
    p.add_argument("--host", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTPS port (8446)")
    p.add_argument("--cert", dest="cert_file", type=Path, help="server certificate (PEM)")
    p.add_argument("--key", dest="key_file", type=Path, help="server private key (PEM)")
    p.add_argument("--public-url", help="the shop's origin (https://localhost:PORT)")
    p.add_argument("--vault-url", dest="url", help="the vault's URL")
    p.add_argument("--ca-bundle", dest="ca_file", type=Path, help="CA of the vault's certificate")
    p.add_argument(
        "--keys-file",
        type=Path,
        help='JSON {"publishable": "pk_…", "secret": "sk_…"}, mode 0600',
    )
    p.add_argument(
        "--element-integrity", help="pin cardvault.js (sha384-…); default: ask the vault"
    )
    p.add_argument("--forward-url", help="the acquirer's URL on the vault's allowlist")
    p.add_argument("--db", dest="db_file", type=Path, help="the SQLite database (0600)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error (info)")
    return p


def element_integrity(vault: Client, settings: ShopSettings, deadline: float) -> str:
    """The hash to put on the script tag: the vault's, checked against a pinned one."""
    while True:
        try:
            served = vault.element_integrity()
            break
        except TransportError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vault did not answer: {exc}") from None
            time.sleep(0.25)
        except (CardVaultError, ValueError) as exc:
            raise RuntimeError(f"the vault did not give cardvault.js's hash: {exc}") from None
    if settings.element_integrity is not None and served != settings.element_integrity:
        # The browser would refuse the script anyway; say why at start-up instead.
        raise RuntimeError(
            "the vault serves a cardvault.js whose hash is not the pinned "
            "vault.element_integrity: check which is right before changing the pin"
        )
    return served


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    log_transport_events_as_json()
    # httpx logs every request it sends at INFO; the shop logs its own events instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "log_level")}
    try:
        settings = load_settings(args.config, overrides)
    except SettingsError as exc:
        _log.error("cannot start", extra={"reason": str(exc)})
        return 2
    try:
        # The shared transport's context: Mozilla intermediate, as every listener.
        ctx = server_context(settings.cert_file, settings.key_file)
        orders = OrderStore(settings.db_file)
        inbox = None
        if settings.webhook_secret is not None:
            inbox = WebhookInbox(settings.db_file, settings.webhook_secret)
    except (OSError, ValueError) as exc:
        # Names the failing step, never file contents.
        detail = getattr(exc, "strerror", None)
        _log.error("cannot start", extra={"error": type(exc).__name__, "detail": detail})
        return 1
    vault = Client(settings.secret_key, base_url=settings.vault_url, ca_bundle=settings.ca_file)
    try:
        integrity = element_integrity(vault, settings, time.monotonic() + STARTUP_WAIT)
        shop = ShopApp(
            origin=settings.origin,
            vault_url=settings.vault_url,
            integrity=integrity,
            publishable_key=settings.publishable_key,
            orders=orders,
            payments=Payments(vault, orders, settings.forward_url),
            inbox=inbox,
        )
        listener = Listener("shop", build_shop_app(shop), settings.host, settings.port, ctx)
        _log.info(
            "shop ready",
            extra={
                "url": settings.origin,
                "vault": settings.vault_url,
                "forward_url": settings.forward_url,
                "db": str(settings.db_file),
                "integrity": integrity,
                "webhooks": inbox is not None,
            },
        )
        run_until_stopped([listener])
    except RuntimeError as exc:
        _log.error("cannot start", extra={"reason": str(exc)})
        return 1
    except OSError as exc:
        # The port is in use or cannot be bound: the message names the listener and port.
        _log.error("cannot listen", extra={"reason": str(exc)})
        return 1
    finally:
        vault.close()
    _log.info("shop stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
