"""The cardvault SDK: an httpx client that verifies certificates on every connection.

    import cardvault.client
    client = cardvault.client.Client("sk_test_…", base_url="https://vault.example:8443",
                                     ca_bundle="/etc/cardvault/ca.pem")
    client.health()

* Certificates and host names are always verified, against the system store or a given
  CA bundle. There is no option that turns verification off.
* Optional pinning: ``pin_sha256`` is a set of base64 SHA-256 hashes of
  SubjectPublicKeyInfo (HPKP style); the pin is checked right after the handshake,
  before a single byte of the request is sent, by :mod:`cardvault.transport.pins` (the
  same check the vault makes before forwarding).
* ``minimum_tls="modern"`` refuses servers that do not speak TLS 1.3.
* Retries on network errors and on 409/429/5xx, with backoff, reusing the same
  ``Idempotency-Key`` (one is generated for every POST), so a retry never does twice
  what the first attempt did.
* Stripe error objects become typed exceptions from :mod:`cardvault.errors`, whose base
  class is exported here as ``CardVaultError`` too, so that an application can use the
  SDK by importing this package alone.
* The API's resources as methods, named as in Stripe's libraries
  (:mod:`cardvault.client.resources`): ``client.payment_methods.create/retrieve/list/
  delete`` and ``client.forwarding.create/retrieve/list``.
"""

from __future__ import annotations

from cardvault.client.http import Client, PinMismatch, TransportError
from cardvault.client.resources import Forwarding, PaymentMethods
from cardvault.errors import CardVaultError

__all__ = [
    "CardVaultError",
    "Client",
    "Forwarding",
    "PaymentMethods",
    "PinMismatch",
    "TransportError",
]
