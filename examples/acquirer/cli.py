"""Command line of the acquirer simulator: parse options, log, serve until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cardvault.logging import configure_logging, get_logger
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context

from .service import AcquirerSettings, build_acquirer_app, validate_redirect_path

__all__ = ["main", "parser"]

_log = get_logger("acquirer")


def _redirect_path(value: str) -> str:
    try:
        return validate_redirect_path(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.acquirer",
        description=(
            "Simulated acquirer for cardvault demos and tests. TEST SIMULATOR: it records "
            "every request it receives, card numbers included, in STATE/received.jsonl. "
            "Never send it real card data."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8445, help="HTTPS port (8445)")
    p.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    p.add_argument(
        "--state",
        type=Path,
        required=True,
        help="state directory; received.jsonl (0600) is written there",
    )
    p.add_argument(
        "--client-ca",
        type=Path,
        help="require client certificates issued by this CA (mutual TLS)",
    )
    p.add_argument(
        "--tls-profile",
        choices=["intermediate", "modern"],
        default="intermediate",
        help="Mozilla TLS profile (intermediate)",
    )
    p.add_argument(
        "--record-api",
        action="store_true",
        help="TEST AID: serve the recorded requests at GET /v1/received (404 otherwise)",
    )
    p.add_argument(
        "--echo-card",
        action="store_true",
        help='TEST AID: echo the card number in every authorization response ("echo")',
    )
    p.add_argument(
        "--redirect-path",
        type=_redirect_path,
        metavar="PATH",
        help="TEST AID: PATH?to=URL[&status=30x] answers a redirect to URL",
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning, error (info)")
    p.add_argument(
        "--log-format", choices=["json", "console"], default="json", help="log format (json)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(profile="production", level=args.log_level, fmt=args.log_format)
    state: Path = args.state
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        ctx = server_context(
            args.cert, args.key, profile=args.tls_profile, client_ca_file=args.client_ca
        )
    except (OSError, ValueError) as exc:
        # Names the failing step, not file contents (a key file must never reach a log).
        _log.error("cannot start", error=type(exc).__name__, detail=getattr(exc, "strerror", None))
        return 1
    settings = AcquirerSettings(
        state_dir=state,
        record_api=args.record_api,
        echo_card=args.echo_card,
        redirect_path=args.redirect_path,
    )
    _log.warning(
        "TEST SIMULATOR: every request received, card numbers included, is recorded",
        file=str(settings.received_file),
        record_api=settings.record_api,
        echo_card=settings.echo_card,
        redirect_path=settings.redirect_path,
        mutual_tls=args.client_ca is not None,
    )
    listener = Listener("acquirer", build_acquirer_app(settings), args.host, args.port, ctx)
    try:
        run_until_stopped([listener])
    except OSError as exc:
        _log.error("cannot listen", error=str(exc))
        return 1
    _log.info("acquirer stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
