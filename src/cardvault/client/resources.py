"""Resource helpers: the API's objects as methods on the client, named as in Stripe's
libraries, each a thin wrapper over :meth:`cardvault.client.Client.request`.

    client.payment_methods.create(card={"number": ..., "exp_month": 12, "exp_year": 2030,
                                        "cvc": ...})
    client.payment_methods.retrieve("pm_…")
    client.payment_methods.list(limit=10)
    client.payment_methods.delete("pm_…")
    client.forwarding.create(payment_method="pm_…", url="https://acquirer.example/v1/charges",
                             replacements=["card_number", "card_expiry", "card_cvc"],
                             request={"headers": [...], "body": "{...}"})
    client.forwarding.retrieve("fwdreq_…")
    client.forwarding.list(limit=10)

Bodies are sent as JSON (the vault takes JSON as well as Stripe's form encoding), so
numbers stay numbers. Every method returns the decoded object, a ``dict``; errors are
the exceptions of :mod:`cardvault.errors`, as for ``request``.

Ids are checked before they go into a path: an id is letters, digits and underscores,
so that no value can change which endpoint is called. The check's message never
repeats the value, which could be anything a caller pasted (a card number, say).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cardvault.client.http import Client

__all__ = ["Forwarding", "PaymentMethods"]

_ID = re.compile(r"[A-Za-z0-9_]{1,255}")


def _path_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be an id made of letters, digits and underscores")
    return value


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError("the server answered something other than a JSON object")
    return body


def _page_params(
    limit: int | None, starting_after: str | None, ending_before: str | None
) -> dict[str, Any] | None:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if starting_after is not None:
        params["starting_after"] = _path_id(starting_after, "starting_after")
    if ending_before is not None:
        params["ending_before"] = _path_id(ending_before, "ending_before")
    return params or None


class _Resource:
    _path: str
    _what: str

    def __init__(self, client: Client) -> None:
        self._client = client

    def _create(self, body: Mapping[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        return _object(
            self._client.request("POST", self._path, json=body, idempotency_key=idempotency_key)
        )

    def retrieve(self, id: str) -> dict[str, Any]:
        """The object with this id (``ResourceMissing`` when there is none)."""
        return _object(self._client.request("GET", f"{self._path}/{_path_id(id, self._what)}"))

    def list(
        self,
        *,
        limit: int | None = None,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> dict[str, Any]:
        """One page, newest first: ``{"object": "list", "data": [...], "has_more": ...}``.

        ``limit`` is 1 to 100 (the server's default is 10); ``starting_after`` (the last
        id of the previous page) or ``ending_before`` move through the pages.
        """
        return _object(
            self._client.request(
                "GET", self._path, params=_page_params(limit, starting_after, ending_before)
            )
        )

    def list_all(self, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every object, newest first, fetching pages of ``page_size`` as it goes."""
        after: str | None = None
        while True:
            page = self.list(limit=page_size, starting_after=after)
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            after = data[-1]["id"]


class PaymentMethods(_Resource):
    """``/v1/payment_methods``: cards, stored encrypted by the vault."""

    _path = "/v1/payment_methods"
    _what = "payment method id"

    def create(
        self,
        *,
        card: Mapping[str, Any],
        billing_details: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        type: str = "card",
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Store a card: ``card`` has ``number``, ``exp_month``, ``exp_year`` and
        optionally ``cvc``. Returns the PaymentMethod (brand, last four, never the number).

        Works with a publishable key too (that is what the card element does); the other
        methods need a secret key.
        """
        body: dict[str, Any] = {"type": type, "card": dict(card)}
        if billing_details is not None:
            body["billing_details"] = dict(billing_details)
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._create(body, idempotency_key)

    def delete(self, id: str) -> dict[str, Any]:
        """Delete the payment method and destroy its card data:
        ``{"id": ..., "object": "payment_method", "deleted": true}``."""
        return _object(self._client.request("DELETE", f"{self._path}/{_path_id(id, self._what)}"))


class Forwarding(_Resource):
    """``/v1/forwarding/requests``: the vault sends a card to an allowlisted destination.

    The answer's ``request_details`` and ``response_details`` are redacted by the vault
    (docs/forwarding.md); ``response_details.body`` is the destination's body as text.
    """

    _path = "/v1/forwarding/requests"
    _what = "forwarding request id"

    def create(
        self,
        *,
        payment_method: str,
        url: str,
        replacements: Sequence[str],
        request: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Forward the card of ``payment_method`` to ``url`` (which must be on the vault's
        allowlist), putting the values named in ``replacements`` (``card_number``,
        ``card_expiry``, ``card_cvc``, ``cardholder_name``) where the destination's
        configuration says.

        ``request`` is Stripe's: ``{"headers": [{"name": ..., "value": ...}], "body":
        "<text>"}``. Give an ``idempotency_key`` that names the payment (an order id, say),
        so that a retry never sends the card twice.
        """
        if isinstance(replacements, str):
            # A string is a sequence of characters: "card_cvc" would become eight wrong names.
            raise TypeError("replacements must be a list of names, not a string")
        body: dict[str, Any] = {
            "payment_method": _path_id(payment_method, "payment_method"),
            "url": url,
            "replacements": [str(r) for r in replacements],
        }
        if request is not None:
            body["request"] = dict(request)
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._create(body, idempotency_key)
