"""The vault: the card-data environment's service.

The vault is the one process that holds card numbers, and only as ciphertext: it takes
cards in (the PaymentMethods API, and the card element that browsers post to), seals
them under data keys from the key service, and lets them out only by forwarding them to
a destination on a static allowlist. No other service, and no API of the vault's, ever
reads a card number back.

Its rooms, from the outside in:

- ``app.py``: wiring only: settings → objects (:class:`~cardvault.vault.app.Vault`) →
  listeners → run. ``workers.py``: several vault processes on one host, started and
  supervised by a parent that binds their ports.
- ``http.py``: every route of the vault, public and admin, in one list; one handler per
  endpoint. ``element.py``: the card element's handlers and its files (``static/``).
- ``accounts.py``: accounts, API keys, authentication and the :class:`Caller`.
  ``payment_methods.py``: the PaymentMethods API (sealing, reading, deleting, the CVC
  sweep). ``idempotency.py``: Idempotency-Key. ``forwarding/``: the only way out for a
  card (its own docstring says more). ``events.py``: Stripe's Event objects, written
  with the change they describe (the outbox); ``webhooks/``: webhook endpoints and the
  delivery of events to them.
- ``params.py``: request parameters and pagination; ``ids.py``: object ids;
  ``ratelimit.py``: per-key buckets; ``settings.py``: the vault's settings.
- ``datakeys.py``: data keys (few key-service calls, bounded exposure) over
  ``keyclient.py``, the vault's mutual-TLS client of the key service.

What it may import:

- never :mod:`cardvault.keyservice`: the key service is another zone, reached only over
  mutual TLS through ``keyclient.py`` (``tests/unit/test_import_boundaries.py`` holds
  this);
- of the crypto layer, only the safe one, :mod:`cardvault.crypto` (seal, open,
  fingerprint, keys); never ``cardvault.crypto.hazmat``;
- storage only through its protocol and records (:mod:`cardvault.storage.base`:
  ``VaultStore`` …); the one implementation is chosen by
  :func:`cardvault.storage.open_vault_store`, in ``app.py`` alone;
- :mod:`cardvault.cards` (card numbers in wipeable buffers, validation, masking),
  :mod:`cardvault.audit` (the recorder), :mod:`cardvault.transport` (TLS, the ASGI app,
  listeners), :mod:`cardvault.errors`, :mod:`cardvault.logging`, :mod:`cardvault.config`.
"""
