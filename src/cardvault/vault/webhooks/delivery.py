"""Delivering events to webhook endpoints: at least once, signed as Stripe signs.

Run by the process that leads the periodic jobs (:func:`cardvault.vault.app._sweeper`
sets :attr:`WebhookDelivery.leading`), every ``[webhooks] poll_interval`` seconds:

1. **Dispatch.** Events not dispatched yet (the outbox) become one delivery row per
   subscribed endpoint of their account and mode, and are marked dispatched, in one
   transaction.
2. **Deliver.** Deliveries due are leased (``next_attempt`` moved past the attempt's
   timeout, so that no other look takes them meanwhile and a crash mid-attempt retries
   once the lease ends) and POSTed: the event's JSON, with ``Stripe-Signature:
   t=<unix>,v1=<HMAC-SHA256 of "t.body" under the endpoint's secret>``, which
   ``stripe.Webhook.construct_event`` verifies. A 2xx answer succeeds it; anything
   else (another status, a redirect, which is never followed, a timeout, a refused
   address or certificate) is retried after ``retry_base_seconds`` doubled at each
   attempt (at most ``retry_max_seconds``), until ``give_up_seconds`` (three days)
   after the event: then it is ``dead``, visible in the API.

Everything is in rows: a restarted vault goes on where the last one stopped. The
receiver may get an event more than once (a crash after it answered, before the answer
was stored); Stripe's receivers dedupe by the event's id, and so should ours.

Connections: the vault's own outbound client
(:class:`~cardvault.vault.forwarding.outbound.OutboundClient`, HTTP/1.1 on asyncio and
httptools, as forwards use it): HTTPS only, the certificate and host name verified (the
system's CAs, or ``[webhooks] ca_file``), no proxy, no redirect followed, one timeout
over the whole attempt, sent once, nothing read past 64 KiB of the answer (the
connection closed then, the status counted). The address check of
:func:`~cardvault.vault.webhooks.endpoints.resolve_public` runs at connect time (the
client's ``resolve`` hook) on the very addresses connected to, each tried in turn, so a
name that was public at creation and resolves to a private address now is refused.
Pools are kept per host and port, for the :data:`_DESTINATIONS` most recently used; an
idle connection is reused under the forwards' rules (keep-alive answered, nothing
arrived since, idle less than 4 s).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Collection
from functools import partial
from typing import Any, Final

import orjson

from cardvault import __version__
from cardvault.crypto.webhook import sign_webhook as sign
from cardvault.logging import get_logger
from cardvault.storage.base import DeliveryRecord, VaultStore
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.events import Events
from cardvault.vault.forwarding.http1 import ProtocolError, ResponseTooLarge
from cardvault.vault.forwarding.outbound import NotConnected, OutboundClient
from cardvault.vault.ids import time_ordered_id
from cardvault.vault.webhooks.endpoints import AddressRefused, open_secret, resolve_public

__all__ = ["WebhookDelivery", "sign"]

_log = get_logger("cardvault.webhooks")

#: The most of an answer read (its body is never kept: only its status matters).
_MAX_ANSWER_BYTES: Final = 64 * 1024
#: Events dispatched, and deliveries attempted, per look.
_BATCH: Final = 100
#: Attempts in flight at once: a look's batch waits here rather than all connecting at
#: once to one endpoint.
_IN_FLIGHT: Final = 16
#: Destinations (host, port) whose connections are kept, the least recently used
#: dropped beyond it: endpoints are created through the API, so the pools are bounded.
_DESTINATIONS: Final = 64
#: Seconds of lease beyond an attempt's timeout (the attempt is cut off at its timeout;
#: this covers storing its outcome). A crash mid-attempt is retried after both.
_LEASE_MARGIN_S: Final = 5.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class WebhookDelivery:
    """Dispatch and delivery (module docstring). ``leading``: this process runs them
    (set by the periodic jobs' leader election)."""

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        events: Events,
        *,
        allowed_hosts: Collection[str] = (),
        timeout: float = 10.0,
        retry_base: float = 60.0,
        retry_max: float = 3600.0,
        give_up: float = 3 * 86_400.0,
        poll_interval: float = 1.0,
        ssl_context: ssl.SSLContext,
    ) -> None:
        self.store = store
        self.keys = keys
        self.events = events
        self.timeout = timeout
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.give_up = give_up
        self.poll_interval = poll_interval
        self.leading = False
        self._in_flight = asyncio.Semaphore(_IN_FLIGHT)
        #: The last look found a full batch: the next one comes at once.
        self.backlog = False
        self._context = lambda: ssl_context
        self._client = OutboundClient(
            resolve=partial(resolve_public, allowed_hosts=frozenset(allowed_hosts)),
            max_pools=_DESTINATIONS,
        )

    async def run(self) -> None:
        """Forever: a look every ``poll_interval`` seconds while this process leads, and
        the next look at once after one that found a full batch to dispatch or attempt:
        a backlog drains at the pace of the deliveries, not one batch per interval
        (bench/events.py)."""
        while True:
            self.backlog = False
            if self.leading:
                try:
                    await self.run_once()
                except Exception:
                    _log.exception("webhook delivery failed; trying again")
            if self.backlog:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(self.poll_interval)

    async def run_once(self) -> int:
        """One look: dispatch what is new, attempt what is due; the attempts made.
        Sets :attr:`backlog` when either found a full batch."""
        dispatched = await self.dispatch()
        now = _now_ms()
        until = now + int((self.timeout + _LEASE_MARGIN_S) * 1000)
        due = await self.store.claim_deliveries(now, until, limit=_BATCH)
        if due:
            await asyncio.gather(*(self._attempt(d) for d in due))
        self.backlog = dispatched >= _BATCH or len(due) >= _BATCH
        return len(due)

    async def dispatch(self) -> int:
        """Deliveries for the events not dispatched yet; the events dispatched."""
        events = await self.store.undispatched_events(limit=_BATCH)
        if not events:
            return 0
        endpoints: dict[tuple[str, bool], list[Any]] = {}
        deliveries: list[DeliveryRecord] = []
        now = _now_ms()
        for event in events:
            scope = (event.account_id, event.livemode)
            if scope not in endpoints:
                endpoints[scope] = await self.store.webhook_endpoints_for(*scope)
            for endpoint in endpoints[scope]:
                if "*" in endpoint.enabled_events or event.type in endpoint.enabled_events:
                    deliveries.append(
                        DeliveryRecord(
                            id=time_ordered_id("whdel_"),
                            account_id=event.account_id,
                            livemode=event.livemode,
                            endpoint_id=endpoint.id,
                            event_id=event.id,
                            created=event.created,
                            next_attempt=now,
                        )
                    )
        await self.store.dispatch_events([e.id for e in events], deliveries)
        return len(events)

    async def _attempt(self, delivery: DeliveryRecord) -> None:
        """One attempt, and its outcome stored."""
        status: int | None = None
        error: str | None = None
        endpoint = await self.store.get_webhook_endpoint(
            delivery.account_id, delivery.livemode, delivery.endpoint_id
        )
        event = await self.store.get_event(
            delivery.account_id, delivery.livemode, delivery.event_id
        )
        if endpoint is None or event is None:
            await self._store(delivery, None, "gone", give_up=True)
            return
        payload = orjson.dumps(await self.events.render(event))
        signature = sign(payload, await open_secret(self.keys, endpoint), int(time.time()))
        try:
            status = await self._post(endpoint.url, payload, signature)
        except AddressRefused:
            error = "address_refused"
        except ResponseTooLarge as exc:
            # Its status counts (the body is never kept); a head too large has none.
            status = exc.status
            if status is None:
                error = "protocol_error"
        except TimeoutError:
            error = "timeout"
        except NotConnected:  # refused, unreachable, the certificate refused
            error = "connection_failed"
        except (ProtocolError, ValueError):  # a broken answer, or a request not writable
            error = "protocol_error"
        except OSError:  # reset or closed once connected
            error = "network_error"
        if status is not None and not 200 <= status < 300:
            error = "http_status"
        await self._store(delivery, status, error)

    async def _post(self, url: str, payload: bytes, signature: str) -> int:
        """The answer's status; the client's exceptions as they come."""
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("User-Agent", f"cardvault-webhooks/{__version__}"),
            ("Stripe-Signature", signature),
        ]
        async with self._in_flight:
            answer = await self._client.exchange(
                None,
                context=self._context,
                url=url,
                method="POST",
                headers=headers,
                body=payload,
                timeout=self.timeout,
                max_response_bytes=_MAX_ANSWER_BYTES,
            )
        return answer.status

    async def _store(
        self,
        delivery: DeliveryRecord,
        status: int | None,
        error: str | None,
        *,
        give_up: bool = False,
    ) -> None:
        now = _now_ms()
        attempts = delivery.attempts + 1
        if error is None:
            state, next_attempt = "succeeded", None
        else:
            delay = min(self.retry_base * 2 ** (attempts - 1), self.retry_max)
            next_attempt = now + int(delay * 1000)
            over = next_attempt > delivery.created * 1000 + int(self.give_up * 1000)
            state = "dead" if (give_up or over) else "pending"
            if state == "dead":
                next_attempt = None
        await self.store.record_delivery_attempt(
            DeliveryRecord(
                id=delivery.id,
                account_id=delivery.account_id,
                livemode=delivery.livemode,
                endpoint_id=delivery.endpoint_id,
                event_id=delivery.event_id,
                created=delivery.created,
                state=state,
                attempts=attempts,
                next_attempt=next_attempt,
                last_attempt=now,
                last_status=status,
                last_error=error,
            )
        )
        log = _log.info if state != "dead" else _log.warning
        log(
            "webhook delivery attempted",
            delivery=delivery.id,
            webhook_endpoint=delivery.endpoint_id,
            event_id=delivery.event_id,
            attempt=attempts,
            status=status,
            error=error,
            state=state,
        )

    async def close(self) -> None:
        await self._client.close()
