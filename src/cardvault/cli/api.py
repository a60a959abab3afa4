"""``cardvault payment-methods`` and ``cardvault forwarding``: the API from a terminal.

Like Stripe's CLI: one command per API call, answers printed as JSON, through the SDK
(:mod:`cardvault.client`). By default the commands talk to the local stack that
``cardvault up`` runs, reading its URL, CA bundle and secret key from
``.cardvault/stack.json``; ``--url``, ``--ca-bundle`` and ``--api-key`` (better:
``CARDVAULT_API_KEY`` in the environment, since a command line is visible to every user
in ``ps``) point them anywhere else.

A card number typed on a command line stays in the shell's history. ``payment-methods
create`` therefore reads the number (and the CVC) from the terminal without echo, or
from standard input, unless they are given as options, and warns when they are.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from cardvault.cli.progress import count_progress
from cardvault.cli.stack import StackOpt, load_stack, stack_path, stack_value
from cardvault.client import CardVaultError, Client, TransportError

__all__ = ["forwarding_app", "payment_methods_app", "register"]

payment_methods_app = typer.Typer(
    help="Payment methods: store a card, read, list and delete them (the vault's API).",
    no_args_is_help=True,
)
forwarding_app = typer.Typer(
    help="Forwarding requests: send a card to an allowlisted destination (the vault's API).",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

#: The demo body for the local stack's simulated acquirer: the vault fills in the card.
DEMO_BODY = '{"amount": 1000, "currency": "usd", "card": {}}'
DEFAULT_REPLACEMENTS = ["card_number", "card_expiry", "card_cvc"]

ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CARDVAULT_API_KEY",
        help="API key (default: the stack's secret key). Prefer the environment variable: "
        "a command line is visible to other users.",
        show_default=False,
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="CARDVAULT_URL", help="The vault's URL (default: the stack's)."),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-bundle",
        envvar="CARDVAULT_CA_BUNDLE",
        help="CA bundle for the vault's certificate (default: the stack's; without a stack, "
        "the system's trust store).",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Page size, 1 to 100.")]
AfterOpt = Annotated[
    str | None, typer.Option("--starting-after", help="The last id of the previous page.")
]
BeforeOpt = Annotated[
    str | None, typer.Option("--ending-before", help="The first id of the next page.")
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every object, page after page.")]
IdemOpt = Annotated[
    str | None,
    typer.Option("--idempotency-key", help="Idempotency-Key (default: a new one per call)."),
]


@dataclass
class Target:
    url: str
    ca_bundle: Path | None
    api_key: str
    stack: dict[str, Any]


def _target(
    stack_file: Path | None,
    url: str | None,
    ca_bundle: Path | None,
    api_key: str | None,
    *,
    publishable: bool = False,
) -> Target:
    """Where to send the call: options first, then the stack file."""
    stack = load_stack(stack_file) if (url is None or api_key is None) else None
    if stack is None and (url is None or api_key is None):
        err.print(
            f"[red]no stack at {stack_path(stack_file)}[/]: start one with `cardvault up`, "
            "or give --url and --api-key (or CARDVAULT_URL and CARDVAULT_API_KEY)"
        )
        raise typer.Exit(2)
    key = api_key or stack_value(stack, "keys", "publishable" if publishable else "secret")
    base = url or stack_value(stack, "vault", "url")
    bundle = stack_value(stack, "ca_bundle")
    ca = ca_bundle or (Path(bundle) if bundle else None)
    if not key or not base:
        err.print(f"[red]the stack file {stack_path(stack_file)} names no vault URL or key[/]")
        raise typer.Exit(2)
    return Target(base, ca, key, stack or {})


@contextmanager
def _client(target: Target) -> Iterator[Client]:
    try:
        client = Client(target.api_key, base_url=target.url, ca_bundle=target.ca_bundle)
    except (ValueError, OSError) as exc:  # an http:// URL, an unreadable CA bundle
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    with client:
        yield client


def _call(target: Target, work: Callable[[Client], T]) -> T:
    with _client(target) as client:
        try:
            return work(client)
        except CardVaultError as exc:
            err.print(f"[red]{exc.code}:[/] {exc.message}", highlight=False)
            raise typer.Exit(1) from None
        except TransportError as exc:
            err.print(f"[red]cannot reach the vault at {target.url}:[/] {exc}")
            raise typer.Exit(1) from None


def _print(obj: Any) -> None:
    out.print_json(json.dumps(obj))


def _secret_input(label: str, value: str | None, option: str) -> str | None:
    """``value`` as given, or (for ``-``) typed without echo at a terminal, or the next
    line of standard input. A value given on the command line gets a warning."""
    if value is None:
        return None
    if value != "-":
        err.print(
            f"[yellow]warning:[/] a {label} on the command line stays in your shell history "
            f"and is visible to other users (ps); use {option} - to type it or pipe it in.",
            highlight=False,
        )
        return value
    if sys.stdin.isatty():
        return getpass.getpass(f"{label}: ")
    return sys.stdin.readline().strip()


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err.print("[red]--metadata takes KEY=VALUE[/]")
            raise typer.Exit(2)
        result[key] = value
    return result


# --- payment methods ------------------------------------------------------------------


@payment_methods_app.command("create")
def pm_create(
    exp_month: Annotated[int, typer.Option("--exp-month", help="Expiry month, 1-12.")],
    exp_year: Annotated[int, typer.Option("--exp-year", help="Expiry year, four digits.")],
    number: Annotated[
        str,
        typer.Option(
            "--number",
            help="The card number, or - (the default) to type it without echo or pipe it in.",
        ),
    ] = "-",
    cvc: Annotated[
        str | None,
        typer.Option("--cvc", help="The CVC, or - to type it without echo or pipe it in."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The cardholder's name.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE (repeatable).")
    ] = None,
    publishable: Annotated[
        bool,
        typer.Option(
            "--publishable", help="Use the stack's publishable key, as the card element does."
        ),
    ] = False,
    idempotency_key: IdemOpt = None,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Store a card: POST /v1/payment_methods. Prints the PaymentMethod (never the number)."""
    target = _target(stack, url, ca_bundle, api_key, publishable=publishable)
    pan = _secret_input("card number", number, "--number") or ""
    # People write numbers in groups; the vault wants the digits.
    pan = pan.replace(" ", "").replace("-", "")
    card: dict[str, Any] = {"number": pan, "exp_month": exp_month, "exp_year": exp_year}
    code = _secret_input("CVC", cvc, "--cvc")
    if code:
        card["cvc"] = code
    billing = {"name": name} if name else None
    _print(
        _call(
            target,
            lambda c: c.payment_methods.create(
                card=card,
                billing_details=billing,
                metadata=_metadata(metadata),
                idempotency_key=idempotency_key,
            ),
        )
    )


@payment_methods_app.command("retrieve")
def pm_retrieve(
    pm_id: Annotated[str, typer.Argument(metavar="ID", help="pm_…")],
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Read one payment method: GET /v1/payment_methods/ID."""
    target = _target(stack, url, ca_bundle, api_key)
    _print(_call(target, lambda c: _checked(c.payment_methods.retrieve, pm_id)))


@payment_methods_app.command("list")
def pm_list(
    limit: LimitOpt = None,
    starting_after: AfterOpt = None,
    ending_before: BeforeOpt = None,
    all_pages: AllOpt = False,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """List payment methods, newest first: GET /v1/payment_methods."""
    target = _target(stack, url, ca_bundle, api_key)
    _print(
        _call(
            target,
            lambda c: _page(c.payment_methods, limit, starting_after, ending_before, all_pages),
        )
    )


@payment_methods_app.command("delete")
def pm_delete(
    pm_id: Annotated[str, typer.Argument(metavar="ID", help="pm_…")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Delete a payment method and destroy its card data: DELETE /v1/payment_methods/ID."""
    target = _target(stack, url, ca_bundle, api_key)
    if not yes and not typer.confirm(f"Delete {pm_id} and destroy its card data?"):
        raise typer.Exit(1)
    _print(_call(target, lambda c: _checked(c.payment_methods.delete, pm_id)))


# --- forwarding -----------------------------------------------------------------------


@forwarding_app.command("create")
def fwd_create(
    payment_method: Annotated[
        str, typer.Option("--payment-method", help="The pm_… whose card to send.")
    ],
    destination_url: Annotated[
        str | None,
        typer.Option(
            "--destination-url",
            help="Where to send it: a URL on the vault's allowlist (default: the stack's "
            "simulated acquirer).",
        ),
    ] = None,
    replacement: Annotated[
        list[str] | None,
        typer.Option(
            "--replacement",
            help="card_number, card_expiry, card_cvc, cardholder_name (repeatable; default: "
            "the first three).",
        ),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option(
            "--header", help='"Name: value" (repeatable; default: Content-Type: application/json).'
        ),
    ] = None,
    body: Annotated[
        str, typer.Option("--body", help="The request body; the vault fills in the card.")
    ] = DEMO_BODY,
    idempotency_key: IdemOpt = None,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Forward a card: POST /v1/forwarding/requests. Prints the redacted request and the
    destination's (redacted) answer."""
    target = _target(stack, url, ca_bundle, api_key)
    destination = destination_url or target.stack.get("acquirer", {}).get("forward_url")
    if not destination:
        err.print("[red]give --destination-url (the stack names no acquirer)[/]")
        raise typer.Exit(2)
    headers = []
    for h in header or ["Content-Type: application/json"]:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            err.print('[red]--header takes "Name: value"[/]')
            raise typer.Exit(2)
        headers.append({"name": name.strip(), "value": value.strip()})
    _print(
        _call(
            target,
            lambda c: _checked(
                lambda pm: c.forwarding.create(
                    payment_method=pm,
                    url=destination,
                    replacements=replacement or DEFAULT_REPLACEMENTS,
                    request={"headers": headers, "body": body},
                    idempotency_key=idempotency_key,
                ),
                payment_method,
            ),
        )
    )


@forwarding_app.command("retrieve")
def fwd_retrieve(
    fwd_id: Annotated[str, typer.Argument(metavar="ID", help="fwdreq_…")],
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Read one forwarding request: GET /v1/forwarding/requests/ID."""
    target = _target(stack, url, ca_bundle, api_key)
    _print(_call(target, lambda c: _checked(c.forwarding.retrieve, fwd_id)))


@forwarding_app.command("list")
def fwd_list(
    limit: LimitOpt = None,
    starting_after: AfterOpt = None,
    ending_before: BeforeOpt = None,
    all_pages: AllOpt = False,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """List forwarding requests, newest first: GET /v1/forwarding/requests."""
    target = _target(stack, url, ca_bundle, api_key)
    _print(
        _call(
            target, lambda c: _page(c.forwarding, limit, starting_after, ending_before, all_pages)
        )
    )


def _checked(call: Callable[[str], T], value: str) -> T:
    """``call(value)``, with a malformed id reported as a usage error (exit 2)."""
    try:
        return call(value)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _page(
    resource: Any,
    limit: int | None,
    starting_after: str | None,
    ending_before: str | None,
    all_pages: bool,
) -> Any:
    try:
        if all_pages:
            items: list[Any] = []
            with count_progress(err, "listing") as advance:
                for item in resource.list_all(page_size=limit or 100):
                    items.append(item)
                    advance(1)
            return items
        return resource.list(
            limit=limit, starting_after=starting_after, ending_before=ending_before
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


# --- the generic verbs, as the Stripe CLI's ------------------------------------------

DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "-d",
        "--data",
        help="A parameter KEY=VALUE, Stripe's form names (card[exp_month]=12); repeatable. "
        "VALUE - reads it from the terminal without echo (or standard input).",
        show_default=False,
    ),
]
PathArg = Annotated[str, typer.Argument(help="The API path, e.g. /v1/payment_methods/pm_…")]


def _params(pairs: list[str] | None) -> dict[str, str]:
    """``-d`` pairs as form parameters; a value that holds a card number gets the
    command-line warning (a card number belongs on stdin: ``-d card[number]=-``)."""
    from cardvault.cards.luhn import find_card_numbers

    found: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err.print("[red]-d takes KEY=VALUE[/]")
            raise typer.Exit(2)
        if value == "-" or next(find_card_numbers(value), None) is not None:
            value = _secret_input(key, value, f"-d {key}=") or ""
        found[key] = value
    return found


def _api_path(path: str) -> str:
    """Only the vault's own API, by a relative path: never a URL, which would take the
    API key elsewhere."""
    if not path.startswith("/v1/") or "://" in path or any(c in path for c in "\r\n\x00 "):
        err.print("[red]PATH must be an API path such as /v1/payment_methods[/]")
        raise typer.Exit(2)
    return path


def _verb(method: str) -> Callable[..., None]:
    def command(
        path: PathArg,
        data: DataOpt = None,
        stack: StackOpt = None,
        url: UrlOpt = None,
        ca_bundle: CaOpt = None,
        api_key: ApiKeyOpt = None,
    ) -> None:
        target = _target(stack, url, ca_bundle, api_key)
        params = _params(data)
        api = _api_path(path)
        if method == "GET":
            _print(_call(target, lambda c: c.get(api, **params)))
        elif method == "POST":
            _print(_call(target, lambda c: c.post(api, params)))
        else:
            if params:
                err.print("[red]delete takes no -d parameters[/]")
                raise typer.Exit(2)
            _print(_call(target, lambda c: c.delete(api)))

    command.__doc__ = (
        f"{method} an API path of the vault, as `stripe {method.lower()}` does; the answer "
        "is printed as JSON. The local stack's secret key by default."
    )
    return command


def register(app: typer.Typer) -> None:
    """Add ``payment-methods``, ``forwarding`` and the generic ``get``, ``post`` and
    ``delete`` to the ``cardvault`` command."""
    app.add_typer(payment_methods_app, name="payment-methods")
    app.add_typer(forwarding_app, name="forwarding")
    for method in ("GET", "POST", "DELETE"):
        app.command(method.lower())(_verb(method))
