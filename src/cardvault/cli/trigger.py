"""``cardvault trigger EVENT``: make an event happen in test mode, as `stripe trigger`.

Each supported event is made the way an integration would make it, through the public
API with a test secret key (the local stack's by default): a payment method stored with
a published test card (``cardvault/cards/test_cards.json``), then deleted, or forwarded
to a destination on the vault's allowlist (the stack's simulated acquirer by default).
The event the vault wrote is then looked up and its id printed, so that it can be
followed in ``cardvault listen`` or a webhook endpoint's deliveries.

Live keys are refused: a trigger stores cards and sends them to a destination, which
only test mode may do for the asking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Final

import typer

from cardvault.cli.api import DEMO_BODY, ApiKeyOpt, CaOpt, UrlOpt
from cardvault.cli.listen import VaultTarget, resolve_vault
from cardvault.cli.stack import StackOpt, stack_value
from cardvault.client import CardVaultError, Client, TransportError

__all__ = ["SUPPORTED_EVENTS", "trigger"]

#: What the fixtures store: a published test card that every test-mode acquirer approves.
_TEST_CARD_BRAND: Final = "visa"
#: The events a trigger may find its own among (newest first).
_LOOKUP_LIMIT: Final = 20


def _published_test_card() -> str:
    """The first published Visa test card that is approved (test_cards.json)."""
    table = json.loads(
        resources.files("cardvault.cards").joinpath("test_cards.json").read_text("utf-8")
    )
    for card in table["cards"]:
        if card["brand"] == _TEST_CARD_BRAND and card["outcome"] is None:
            return str(card["number"])
    raise RuntimeError("test_cards.json has no approved Visa test card")  # pragma: no cover


def _store_card(client: Client, event: str) -> dict[str, Any]:
    card = {
        "number": _published_test_card(),
        "exp_month": 12,
        "exp_year": time.gmtime().tm_year + 3,
        "cvc": "123",
    }
    return client.payment_methods.create(
        card=card,
        billing_details={"name": "Jenny Rosen"},
        metadata={"cardvault_trigger": event},
    )


def _payment_method_created(client: Client, _target: VaultTarget, _dest: str | None) -> str:
    return str(_store_card(client, "payment_method.created")["id"])


def _payment_method_deleted(client: Client, _target: VaultTarget, _dest: str | None) -> str:
    pm = _store_card(client, "payment_method.deleted")
    client.payment_methods.delete(str(pm["id"]))
    return str(pm["id"])


def _forwarding_request_created(client: Client, target: VaultTarget, dest: str | None) -> str:
    destination = dest or stack_value(target.stack, "acquirer", "forward_url")
    if not isinstance(destination, str) or not destination:
        raise typer.BadParameter(
            "give --destination-url, a URL on the vault's allowlist (the stack names no acquirer)"
        )
    pm = _store_card(client, "forwarding.request.created")
    forwarded = client.forwarding.create(
        payment_method=str(pm["id"]),
        url=destination,
        replacements=["card_number", "card_expiry", "card_cvc"],
        request={
            "headers": [{"name": "Content-Type", "value": "application/json"}],
            "body": DEMO_BODY,
        },
    )
    return str(forwarded["id"])


Fixture = Callable[[Client, VaultTarget, str | None], str]

#: The events ``trigger`` makes, and how.
SUPPORTED_EVENTS: Final[dict[str, Fixture]] = {
    "payment_method.created": _payment_method_created,
    "payment_method.deleted": _payment_method_deleted,
    "forwarding.request.created": _forwarding_request_created,
}


def _event_for(client: Client, event_type: str, object_id: str) -> dict[str, Any] | None:
    """The event of ``event_type`` the vault wrote about ``object_id`` (written in the
    same transaction as the change, so it is there once the call has answered)."""
    page = client.get("/v1/events", type=event_type, limit=_LOOKUP_LIMIT)
    for event in page["data"]:
        obj = event.get("data", {}).get("object", {})
        if isinstance(obj, dict) and obj.get("id") == object_id:
            return dict(event)
    return None


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def trigger(
    event: Annotated[
        str,
        typer.Argument(
            metavar="EVENT", help="The event to make: " + ", ".join(SUPPORTED_EVENTS) + "."
        ),
    ],
    destination_url: Annotated[
        str | None,
        typer.Option(
            "--destination-url",
            help="forwarding.request.created: a URL on the vault's allowlist (default: the "
            "stack's simulated acquirer).",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the event's id and type as JSON.")
    ] = False,
    stack: StackOpt = None,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Make an event happen in test mode, as `stripe trigger` does: through the API, with
    a published test card. Test secret keys only."""
    fixture = SUPPORTED_EVENTS.get(event)
    if fixture is None:
        raise _fail("unsupported event type; trigger supports: " + ", ".join(SUPPORTED_EVENTS), 2)
    target = resolve_vault(stack, url, ca_bundle, api_key)
    if not target.api_key.startswith("sk_test_"):
        raise _fail("trigger runs in test mode only: give a test secret key (sk_test_…)", 2)
    if not json_out:
        typer.echo(f"Setting up fixture for: {event}")
    try:
        client = Client(target.api_key, base_url=target.url, ca_bundle=target.ca_bundle)
    except (ValueError, OSError) as exc:  # an http:// URL, an unreadable CA bundle
        raise _fail(str(exc), 2) from None
    with client:
        try:
            object_id = fixture(client, target, destination_url)
            found = _event_for(client, event, object_id)
        except CardVaultError as exc:
            raise _fail(f"{exc.code}: {exc.message}", 1) from None
        except TransportError as exc:
            raise _fail(f"cannot reach the vault at {target.url}: {exc}", 1) from None
    if found is None:
        raise _fail(f"{object_id} was made, but the vault wrote no {event} event for it", 1)
    if json_out:
        typer.echo(json.dumps({"type": event, "event": found["id"], "object": object_id}))
    else:
        typer.echo(f"Trigger succeeded! {event} [{found['id']}] for {object_id}")
