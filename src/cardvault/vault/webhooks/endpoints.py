"""Webhook endpoints: ``/v1/webhook_endpoints`` in Stripe's shape, and where they may
point.

An endpoint's URL is checked like a forwarding destination's
(:func:`~cardvault.vault.forwarding.allowlist.parse_url`: ``https://`` only, a DNS name
and never an IP literal, no user info, query or fragment) and its host must resolve
only to public addresses (:func:`resolve_public`: no loopback, private, link-local,
shared, multicast or reserved address) unless ``[webhooks] allowed_hosts`` names it.
The same check runs again at every delivery, on the addresses the delivery connects to
(:mod:`cardvault.vault.webhooks.delivery`), so a name that later resolves elsewhere is
refused then too.

The signing secret (``whsec_…``) is returned once, by the create; it is stored only
sealed under a ``pan`` data key bound to the endpoint's account, mode and id, opened
only to sign a delivery, and never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Collection
from functools import partial
from typing import Any, Final

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.crypto.webhook import new_webhook_secret
from cardvault.errors import APIError, InvalidRequestError, ParameterMissing, ResourceMissing
from cardvault.logging import get_logger
from cardvault.storage.base import DeliveryRecord, VaultStore, WebhookEndpointRecord
from cardvault.vault.accounts import Caller, require_secret
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.events import API_VERSION, EVENT_TYPES
from cardvault.vault.forwarding.allowlist import ParsedUrl, UrlRefused, parse_url
from cardvault.vault.ids import looks_like_id, time_ordered_id
from cardvault.vault.params import check_keys, list_object, parse_metadata, read_page

__all__ = [
    "AddressRefused",
    "WebhookEndpoints",
    "open_secret",
    "render_delivery",
    "resolve_public",
    "secret_context",
]

_log = get_logger("cardvault.vault")

_PARAMS: Final = frozenset({"url", "enabled_events", "description", "metadata", "expand"})
_DESCRIPTION_MAX: Final = 5000
#: Stripe's limit of endpoints per account (and mode here).
_MOST_ENDPOINTS: Final = 16
#: The most deliveries one list answers.
_DELIVERIES_MAX: Final = 100


class AddressRefused(Exception):
    """A webhook URL's host resolves to no address, or to one it may not reach. The
    reason is a constant."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_public(host: str, port: int, allowed_hosts: Collection[str]) -> list[str]:
    """The addresses of ``host`` a delivery may connect to: all of them, which must all
    be public unless ``allowed_hosts`` names the host. Raises :class:`AddressRefused`."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressRefused("does not resolve") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise AddressRefused("does not resolve")
    if host not in allowed_hosts and not all(_public(a) for a in addresses):
        raise AddressRefused("resolves to an address that is not public")
    return addresses


def secret_context(account_id: str, livemode: bool, endpoint_id: str) -> dict[str, str]:
    """The associated data an endpoint's signing secret is sealed under."""
    mode = "live" if livemode else "test"
    return {"account": account_id, "mode": mode, "object": endpoint_id, "field": "secret"}


async def open_secret(keys: DataKeyManager, record: WebhookEndpointRecord) -> str:
    """An endpoint's signing secret, opened (to sign a delivery: never returned)."""
    key = await keys.for_decryption(record.data_key_id, "pan")
    context = secret_context(record.account_id, record.livemode, record.id)
    try:
        return crypto.open_(key, record.secret_ct, context).decode("ascii")
    except crypto.InvalidCiphertext as exc:
        _log.error("a stored webhook secret failed authentication", webhook_endpoint=record.id)
        raise APIError() from exc


def _ms_to_s(value: int | None) -> int | None:
    return None if value is None else value // 1000


def render_delivery(record: DeliveryRecord) -> dict[str, Any]:
    """A delivery as the API shows it: ``status`` is ``pending``, ``succeeded`` or
    ``dead`` (given up after three days of retries: the dead-letter state)."""
    return {
        "id": record.id,
        "object": "webhook_delivery",
        "created": record.created,
        "event": record.event_id,
        "livemode": record.livemode,
        "webhook_endpoint": record.endpoint_id,
        "status": record.state,
        "attempts": record.attempts,
        "next_attempt": _ms_to_s(record.next_attempt) if record.state == "pending" else None,
        "last_attempt": _ms_to_s(record.last_attempt),
        "last_status": record.last_status,
        "last_error": record.last_error,
    }


class WebhookEndpoints:
    """The webhook endpoints API: create (the secret shown once), retrieve, list,
    delete, and an endpoint's deliveries."""

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        audit: Recorder,
        *,
        allowed_hosts: Collection[str] = (),
    ) -> None:
        self.store = store
        self.keys = keys
        self.audit = audit
        self.allowed_hosts = frozenset(allowed_hosts)

    async def create(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        require_secret(caller)
        check_keys(params, _PARAMS)
        url = await self._url(params.get("url"))
        enabled = _enabled_events(params.get("enabled_events"))
        description = params.get("description")
        if description in (None, ""):
            description = None
        elif not isinstance(description, str) or len(description) > _DESCRIPTION_MAX:
            raise InvalidRequestError(
                f"description must be a string of at most {_DESCRIPTION_MAX} characters.",
                param="description",
            )
        metadata = parse_metadata(params.get("metadata"))
        existing = await self.store.webhook_endpoints_for(caller.account_id, caller.livemode)
        if len(existing) >= _MOST_ENDPOINTS:
            raise InvalidRequestError(
                f"An account may have at most {_MOST_ENDPOINTS} webhook endpoints per mode.",
                param="url",
            )
        endpoint_id = time_ordered_id("we_")
        secret = new_webhook_secret()
        dk_id, dk = await self.keys.for_encryption("pan")
        sealed = crypto.seal(
            dk,
            secret.encode("ascii"),
            secret_context(caller.account_id, caller.livemode, endpoint_id),
        )
        record = WebhookEndpointRecord(
            id=endpoint_id,
            account_id=caller.account_id,
            livemode=caller.livemode,
            created=int(time.time()),
            url=url.canonical,
            enabled_events=enabled,
            data_key_id=dk_id,
            secret_ct=sealed,
            description=description,
            metadata=metadata,
        )
        await self.audit.record(
            "webhook_endpoint.created",
            actor=caller.key_id,
            object_id=endpoint_id,
            detail={"livemode": caller.livemode, "host": url.host},
        )
        await self.store.create_webhook_endpoint(record)
        return {**self.render(record), "secret": secret}

    async def retrieve(self, caller: Caller, endpoint_id: str) -> dict[str, Any]:
        require_secret(caller)
        return self.render(await self._find(caller, endpoint_id))

    async def list_endpoints(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        require_secret(caller)
        fetch = partial(self.store.list_webhook_endpoints, caller.account_id, caller.livemode)
        records, has_more = await read_page(query, "we_", fetch, params={"expand"})
        return list_object("/v1/webhook_endpoints", [self.render(r) for r in records], has_more)

    async def delete(self, caller: Caller, endpoint_id: str) -> dict[str, Any]:
        require_secret(caller)
        await self._find(caller, endpoint_id)
        await self.audit.record(
            "webhook_endpoint.deleted", actor=caller.key_id, object_id=endpoint_id
        )
        if not await self.store.delete_webhook_endpoint(
            caller.account_id, caller.livemode, endpoint_id
        ):
            raise _no_such_endpoint(endpoint_id)
        return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}

    async def deliveries(
        self, caller: Caller, endpoint_id: str, query: dict[str, Any]
    ) -> dict[str, Any]:
        """The endpoint's deliveries, newest first (``limit``, 1 to 100, default 10)."""
        require_secret(caller)
        check_keys(query, {"limit"})
        raw = query.get("limit", "10")
        if not (isinstance(raw, str) and raw.isdigit() and 1 <= int(raw) <= _DELIVERIES_MAX):
            raise InvalidRequestError(
                f"limit must be an integer from 1 to {_DELIVERIES_MAX}.", param="limit"
            )
        await self._find(caller, endpoint_id)
        found = await self.store.list_deliveries(
            caller.account_id, caller.livemode, endpoint_id, limit=int(raw) + 1
        )
        url = f"/v1/webhook_endpoints/{endpoint_id}/deliveries"
        data = [render_delivery(d) for d in found[: int(raw)]]
        return list_object(url, data, len(found) > int(raw))

    @staticmethod
    def render(record: WebhookEndpointRecord) -> dict[str, Any]:
        """Stripe's ``webhook_endpoint``, without its secret (shown by the create only)."""
        return {
            "id": record.id,
            "object": "webhook_endpoint",
            "api_version": API_VERSION,
            "application": None,
            "created": record.created,
            "description": record.description,
            "enabled_events": record.enabled_events,
            "livemode": record.livemode,
            "metadata": record.metadata,
            "status": "enabled",
            "url": record.url,
        }

    # -- helpers ---------------------------------------------------------------------------

    async def _find(self, caller: Caller, endpoint_id: str) -> WebhookEndpointRecord:
        record = None
        if looks_like_id(endpoint_id, "we_"):
            record = await self.store.get_webhook_endpoint(
                caller.account_id, caller.livemode, endpoint_id
            )
        if record is None:
            raise _no_such_endpoint(endpoint_id)
        return record

    async def _url(self, value: object) -> ParsedUrl:
        if value in (None, ""):
            raise ParameterMissing("Missing required param: url.", param="url")
        try:
            url = parse_url(value)
        except UrlRefused as exc:
            raise InvalidRequestError(f"url {exc.reason}.", param="url") from exc
        try:
            await resolve_public(url.host, url.port, self.allowed_hosts)
        except AddressRefused as exc:
            raise InvalidRequestError(f"url's host {exc.reason}.", param="url") from exc
        return url


def _enabled_events(value: object) -> list[str]:
    if value in (None, "", []):
        raise ParameterMissing("Missing required param: enabled_events.", param="enabled_events")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError("enabled_events must be a list.", param="enabled_events")
    unknown = [v for v in value if v != "*" and v not in EVENT_TYPES]
    if unknown:
        raise InvalidRequestError(
            "enabled_events holds an unknown event type; known: * and "
            + ", ".join(sorted(EVENT_TYPES))
            + ".",
            param="enabled_events",
        )
    return list(dict.fromkeys(value))


def _no_such_endpoint(endpoint_id: str) -> ResourceMissing:
    if looks_like_id(endpoint_id, "we_"):
        return ResourceMissing(f"No such webhook endpoint: '{endpoint_id}'", param="id")
    return ResourceMissing("No such webhook endpoint.", param="id")
