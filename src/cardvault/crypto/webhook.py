"""Stripe's webhook signature: ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256>``.

One signer for both senders of signed events: the vault's webhook delivery
(:mod:`cardvault.vault.webhooks.delivery`) and ``cardvault listen``
(:mod:`cardvault.cli.listen`), so that a receiver verifies either with the same
``stripe.Webhook.construct_event(body, header, secret)``.

The MAC is over ``"<timestamp>.<payload>"`` and its key is the secret's whole text,
``whsec_`` included, as Stripe's libraries take it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

__all__ = ["WEBHOOK_SECRET_PREFIX", "new_webhook_secret", "sign_webhook"]

#: Every signing secret starts so, as Stripe's do: a leaked one can be found by grep.
WEBHOOK_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a prefix, not a secret)


def new_webhook_secret() -> str:
    """A new signing secret: ``whsec_`` and 256 random bits (URL-safe base64)."""
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def sign_webhook(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` value for ``payload`` sent at ``timestamp``:
    ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<payload>" under the secret>``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
