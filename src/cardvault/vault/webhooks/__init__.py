"""Webhooks: the endpoints events are delivered to, and their delivery.

- ``endpoints.py``: ``/v1/webhook_endpoints`` (Stripe's shape; the ``whsec_`` secret
  shown once and stored sealed), and where a webhook URL may point;
- ``delivery.py``: dispatching events to endpoints and delivering them, at least once,
  signed with ``Stripe-Signature``, with retries for up to three days;
- ``http.py``: the handlers of ``/v1/events`` and ``/v1/webhook_endpoints``.

It gets the store, the data keys, the events and the audit recorder in its
constructors; the events themselves are :mod:`cardvault.vault.events`.
"""

from cardvault.vault.webhooks.delivery import WebhookDelivery, sign
from cardvault.vault.webhooks.endpoints import WebhookEndpoints

__all__ = ["WebhookDelivery", "WebhookEndpoints", "sign"]
