"""``cardvault listen``: the vault's events, live, forwarded to a local endpoint.

As ``stripe listen --forward-to URL``: each new event of the key's account and mode is
POSTed to URL as the vault's webhooks are (the Event's JSON, ``Stripe-Signature:
t=…,v1=…``), signed with a ``whsec_`` secret of this command's own, so that the
receiver under development verifies it with ``stripe.Webhook.construct_event`` as it
will verify the vault's. Beside a running local stack it finds the vault, its CA
bundle and the demo account's secret key by itself (``.cardvault/stack.json``).

How events arrive: a long-poll. ``GET /v1/events?ending_before=<newest seen>&wait=25``
(``wait`` is the vault's extension: the answer waits for an event to exist); the
answer's events are forwarded oldest first, and the next poll starts at once.

Where events may go: ``https://`` (the certificate verified against the system's CAs
or ``--ca-bundle``; nothing turns that off), or ``http://`` to a loopback address only,
which never leaves the machine. Redirects are not followed; each delivery has its own
timeout; a receiver that is down is reported and listening goes on (an event is tried
once: the vault's webhook endpoints are what retries).

The signing secret is kept in a private file (``listen.json`` beside the stack file, or
under ``$XDG_CONFIG_HOME/cardvault``), made on first use, so that it stays the same from
one run to the next and ``--print-secret`` prints the one ``listen`` signs with.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import httpx
import typer

from cardvault import __version__
from cardvault.cli.api import ApiKeyOpt, CaOpt, UrlOpt
from cardvault.cli.stack import StackOpt, load_stack, stack_path, stack_value
from cardvault.client import CardVaultError, Client, TransportError
from cardvault.crypto.webhook import WEBHOOK_SECRET_PREFIX, new_webhook_secret, sign_webhook
from cardvault.errors import AuthenticationError, InvalidRequestError, PermissionDenied
from cardvault.files import write_private
from cardvault.transport.tls import client_context

__all__ = ["ForwardTarget", "VaultTarget", "forward_target", "listen", "resolve_vault"]

#: Seconds one poll of the vault waits for an event (the vault allows up to 30).
POLL_WAIT: Final = 25
#: The longest forward-to URL taken.
_MAX_URL: Final = 2048
#: The most of a receiver's answer read (only its status is used).
_MAX_ANSWER_BYTES: Final = 64 * 1024
#: An ``--events`` entry: an event type, a prefix ending in ``.*``, or ``*``.
_EVENT_FILTER = re.compile(r"\*|[a-z][a-z_]*(\.[a-z][a-z_]*)*(\.\*)?")
_MAX_FILTERS: Final = 50
_LISTEN_FILE = "listen.json"


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` on standard error; the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# --- where events come from -------------------------------------------------------------


@dataclass(frozen=True)
class VaultTarget:
    """The vault and the key: from the options, else the local stack."""

    url: str
    ca_bundle: Path | None
    api_key: str
    stack: dict[str, Any]


def resolve_vault(
    stack_file: Path | None, url: str | None, ca_bundle: Path | None, api_key: str | None
) -> VaultTarget:
    """Options first, then the stack file; a secret key is required (exit 2 otherwise)."""
    stack = load_stack(stack_file) if (url is None or api_key is None) else None
    if stack is None and (url is None or api_key is None):
        raise _fail(
            f"no stack at {stack_path(stack_file)}: start one with `cardvault up`, or give "
            "--url and --api-key (or CARDVAULT_URL and CARDVAULT_API_KEY)"
        )
    key = api_key or stack_value(stack, "keys", "secret")
    base = url or stack_value(stack, "vault", "url")
    bundle = stack_value(stack, "ca_bundle")
    if not isinstance(key, str) or not isinstance(base, str) or not key or not base:
        raise _fail(f"the stack file {stack_path(stack_file)} names no vault URL or secret key")
    if not key.startswith(("sk_test_", "sk_live_")):
        raise _fail("a secret key is needed (sk_test_… or sk_live_…)")
    ca = ca_bundle or (Path(bundle) if isinstance(bundle, str) and bundle else None)
    return VaultTarget(base, ca, key, stack or {})


# --- where events go ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardTarget:
    url: str


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def forward_target(text: str) -> ForwardTarget:
    """The URL events are POSTed to: ``https://`` anywhere, ``http://`` to a loopback
    host only (``localhost:4242/hooks``, as Stripe's CLI takes it, is
    ``http://localhost:4242/hooks``). No user info; at most 2048 characters. Raises
    :class:`ValueError` saying what is wrong."""
    if len(text) > _MAX_URL or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ValueError(f"--forward-to must be a URL of at most {_MAX_URL} characters")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        # (.port raises ValueError for a malformed port.)
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("--forward-to is not a URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("--forward-to must be an https:// URL, or http:// to localhost")
    if parts.username is not None or parts.password is not None:
        raise ValueError("--forward-to must not hold a user name or password")
    if parts.scheme == "http" and not _loopback(host):
        raise ValueError(
            "--forward-to over plain http:// must point at this machine (localhost, "
            "127.0.0.1, [::1]): events would cross the network unencrypted. Use https://."
        )
    return ForwardTarget(parts._replace(fragment="").geturl())


def event_filters(text: str | None) -> list[str]:
    """``--events a,b.*``: the types forwarded (every type when not given)."""
    if text is None:
        return ["*"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(names) > _MAX_FILTERS:
        raise ValueError(f"--events takes 1 to {_MAX_FILTERS} event types, comma-separated")
    for name in names:
        if len(name) > 100 or not _EVENT_FILTER.fullmatch(name):
            raise ValueError(
                "--events takes event types (payment_method.created), prefixes ending in "
                "'.*' (payment_method.*) or '*'"
            )
    return names


def wanted(event_type: str, filters: list[str]) -> bool:
    return any(
        f == "*" or f == event_type or (f.endswith(".*") and event_type.startswith(f[:-1]))
        for f in filters
    )


# --- the signing secret ----------------------------------------------------------------


def secret_file(given: Path | None, stack_file: Path | None) -> Path:
    """Where the signing secret is kept: the one given, else beside the stack file when
    there is one, else ``$XDG_CONFIG_HOME/cardvault/listen.json``."""
    if given is not None:
        return given
    stack = stack_path(stack_file)
    if stack.exists():
        return stack.parent / _LISTEN_FILE
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "cardvault" / _LISTEN_FILE


def signing_secret(path: Path) -> str:
    """The secret kept at ``path``, made (and written 0600) on first use."""
    if not path.exists():
        secret = new_webhook_secret()
        write_private(path, json.dumps({"secret": secret}).encode())
        return secret
    try:
        mode = path.stat().st_mode
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise _fail(f"cannot read the signing secret file {path}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _fail(f"the signing secret file {path} is readable by other users: chmod 600 it")
    kept = data.get("secret") if isinstance(data, dict) else None
    if not isinstance(kept, str) or not kept.startswith(WEBHOOK_SECRET_PREFIX):
        raise _fail(f'the signing secret file {path} needs "secret": a whsec_ secret')
    return kept


# --- forwarding -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str | None
    elapsed_ms: int


class Forwarder:
    """POSTs events to one URL, signed; never follows a redirect, never retries."""

    def __init__(
        self,
        target: ForwardTarget,
        secret: str,
        *,
        ca_bundle: Path | None,
        extra_ca: Path | None = None,
        timeout: float,
    ) -> None:
        """``ca_bundle`` replaces the system's trust store; ``extra_ca`` (the local
        stack's CA, whose certificates its receivers have) is trusted beside it."""
        self.url = target.url
        self.secret = secret
        self.timeout = timeout
        context = client_context(ca_bundle)
        if ca_bundle is None and extra_ca is not None:
            context.load_verify_locations(cafile=str(extra_ca))
        self.http = httpx.Client(
            verify=context,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            headers={"user-agent": f"cardvault-cli/{__version__} (listen)"},
        )

    def close(self) -> None:
        self.http.close()

    def post(self, event: dict[str, Any]) -> Outcome:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json; charset=utf-8",
            "stripe-signature": sign_webhook(body, self.secret, int(time.time())),
        }
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            with self.http.stream("POST", self.url, content=body, headers=headers) as answer:
                status = answer.status_code
                read = 0
                for chunk in answer.iter_raw():
                    read += len(chunk)
                    if read > _MAX_ANSWER_BYTES:
                        break
        except httpx.TimeoutException:
            error = f"timed out after {self.timeout:g} s"
        except httpx.ConnectError as exc:
            error = _connect_error(exc)
        except httpx.HTTPError as exc:
            error = f"failed: {type(exc).__name__}"
        return Outcome(status, error, int((time.monotonic() - started) * 1000))


def _connect_error(exc: Exception) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "its certificate does not verify (give its CA with --forward-ca-bundle)"
    if "refused" in text.lower():
        return "connection refused (is it running?)"
    return "cannot connect"


# --- the vault's events -------------------------------------------------------------------


class _Stop(BaseException):
    """SIGTERM or Ctrl-C (a BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way swallows it)."""


def _on_stop_signal(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def new_events(client: Client, cursor: str | None, echo: Any) -> Iterator[dict[str, Any]]:
    """The events newer than ``cursor`` (every event, when None), oldest first, for as
    long as the caller iterates.

    The vault being unreachable or unavailable is reported (``echo``) and polled again
    after a pause that grows to 10 s; a key it refuses ends the listening (exit 1)."""
    pause = 0.5
    while True:
        params: dict[str, Any] = {"limit": 100, "wait": POLL_WAIT}
        if cursor is not None:
            params["ending_before"] = cursor
        try:
            page = client.get("/v1/events", **params)
            found: list[dict[str, Any]] = list(page["data"])
            if cursor is None and page["has_more"]:
                found += _older(client, found[-1]["id"])
        except (AuthenticationError, PermissionDenied, InvalidRequestError) as exc:
            raise _fail(f"the vault refused: {exc.code}: {exc.message}", 1) from None
        except (CardVaultError, TransportError) as exc:
            echo(f"warning: cannot read events ({_describe(exc)}); trying again", err=True)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)
            continue
        pause = 0.5
        if found:
            cursor = str(found[0]["id"])
        yield from reversed(found)


def newest_event(client: Client) -> str | None:
    """The id of the account's newest event (None: it has none yet): where listening
    starts, as Stripe's does, with what happens from now on."""
    try:
        page = client.get("/v1/events", limit=1)
    except CardVaultError as exc:
        raise _fail(f"the vault refused: {exc.code}: {exc.message}", 1) from None
    except TransportError as exc:
        raise _fail(f"cannot reach the vault: {exc}", 1) from None
    data = page.get("data") or []
    return str(data[0]["id"]) if data else None


def _older(client: Client, oldest: str) -> list[dict[str, Any]]:
    """Events older than ``oldest``, all of them (the first poll of an account that had
    none found more than a page)."""
    found: list[dict[str, Any]] = []
    while True:
        page = client.get("/v1/events", limit=100, starting_after=oldest)
        found += page["data"]
        if not page["has_more"] or not page["data"]:
            return found
        oldest = str(page["data"][-1]["id"])


def _describe(exc: Exception) -> str:
    if isinstance(exc, CardVaultError):
        return f"{exc.code}: {exc.message}"
    return str(exc)


# --- the command ----------------------------------------------------------------------------


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def listen(
    forward_to: Annotated[
        str | None,
        typer.Option(
            "--forward-to",
            "-f",
            help="Where to POST each event: https://… (verified), or http:// to localhost "
            "only (localhost:4242/hooks means http://localhost:4242/hooks).",
            show_default=False,
        ),
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(
            "--events",
            "-e",
            help="Only these event types, comma-separated (prefix.* for a family; default: all).",
            show_default=False,
        ),
    ] = None,
    print_secret: Annotated[
        bool,
        typer.Option("--print-secret", help="Print the webhook signing secret and exit."),
    ] = False,
    json_lines: Annotated[
        bool, typer.Option("--json", help="One JSON object per forwarded event.")
    ] = False,
    forward_ca_bundle: Annotated[
        Path | None,
        typer.Option(
            "--forward-ca-bundle",
            help="CA bundle for an https:// --forward-to, instead of the system's trust "
            "store (default: the system's, and the stack's CA beside a stack).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=120.0, help="Seconds per delivery.")
    ] = 10.0,
    secret_file_opt: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            envvar="CARDVAULT_LISTEN_SECRET_FILE",
            help="Where the signing secret is kept (default: listen.json beside the stack "
            "file, else in $XDG_CONFIG_HOME/cardvault).",
            show_default=False,
        ),
    ] = None,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Forward the vault's events, live, to a local endpoint, as `stripe listen` does:
    signed with a whsec_ secret of this command's, which it prints."""
    secret = signing_secret(secret_file(secret_file_opt, stack))
    if print_secret:
        _line(secret)
        return
    if forward_to is None:
        raise _fail("give --forward-to URL (or --print-secret)")
    try:
        target = forward_target(forward_to)
        filters = event_filters(events)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    vault = resolve_vault(stack, url, ca_bundle, api_key)
    bundle = stack_value(vault.stack, "ca_bundle")
    stack_ca = Path(bundle) if isinstance(bundle, str) and bundle else None
    try:
        client = Client(
            vault.api_key, base_url=vault.url, ca_bundle=vault.ca_bundle, timeout=POLL_WAIT + 15
        )
        forwarder = Forwarder(
            target, secret, ca_bundle=forward_ca_bundle, extra_ca=stack_ca, timeout=timeout
        )
    except (ValueError, OSError) as exc:  # an http:// vault URL, an unreadable CA bundle
        raise _fail(str(exc)) from None
    # Both are handled here, as `cardvault up` does: a process started with SIGINT
    # ignored (a background job of a non-interactive shell) still stops on Ctrl-C.
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with client:
            cursor = newest_event(client)
            typer.echo(f"Ready! Your webhook signing secret is {secret} (^C to quit)", err=True)
            for event in new_events(client, cursor, typer.echo):
                if wanted(str(event.get("type")), filters):
                    _forward(forwarder, event, json_lines)
    except (KeyboardInterrupt, _Stop):
        typer.echo("Stopped.", err=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        forwarder.close()


def _forward(forwarder: Forwarder, event: dict[str, Any], json_lines: bool) -> None:
    event_id, event_type = str(event.get("id")), str(event.get("type"))
    if not json_lines:
        _line(f"{_stamp()}   --> {event_type} [{event_id}]")
    outcome = forwarder.post(event)
    if json_lines:
        obj = event.get("data", {}).get("object", {})
        _line(
            json.dumps(
                {
                    "event": event_id,
                    "type": event_type,
                    "object": obj.get("id") if isinstance(obj, dict) else None,
                    "livemode": event.get("livemode"),
                    "forward_to": forwarder.url,
                    "status": outcome.status,
                    "error": outcome.error,
                    "elapsed_ms": outcome.elapsed_ms,
                }
            )
        )
    elif outcome.error is None:
        _line(f"{_stamp()}  <--  [{outcome.status}] POST {forwarder.url} [{event_id}]")
    else:
        _line(f"{_stamp()}  <--  [ERROR] POST {forwarder.url} [{event_id}]: {outcome.error}")
