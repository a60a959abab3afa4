"""Forwarding: the only way a card number leaves the vault (Stripe's forwarding API).

A caller with a secret key asks the vault to send a payment method's card to a URL;
the vault sends it only to a destination on its allowlist, a file read once at start-up
that no API changes. docs/forwarding.md has the API, the file and the threat model.

- ``forwarder.py``: :class:`~cardvault.vault.forwarding.forwarder.Forwarder`, the API
  (create, retrieve, list) and the order of a forward's steps; it opens the card into
  its wipeable type and reveals it only to build the outbound request.
- ``allowlist.py``: the allowlist as the vault holds it (destinations, placements,
  credentials) and :func:`~cardvault.vault.forwarding.allowlist.match_url`, the strict
  matcher of a caller's URL.
- ``loader.py``: reading the allowlist file (its format is documented there), and
  ``checks.py``: the checks of each ``[[destination]]`` table.
- ``placement.py``: the placement engine: the outbound body and headers with the card
  values in (or masked, for the stored copy), and the caller's headers.
- ``outbound.py``: the outbound HTTPS client: verified, pinned, no redirects, no
  proxies, bounded, pooled, each request sent once; ``http1.py``: its HTTP/1.1
  connection (the request written, the answer parsed by httptools).

What it may import: what the vault may (see :mod:`cardvault.vault`), and of the vault's
other rooms only public names: :class:`~cardvault.vault.accounts.Caller` and
:func:`~cardvault.vault.accounts.require_secret`, the payment-method look-up and
sealing context of :mod:`cardvault.vault.payment_methods`, the data keys, ids and
parameter checks. The :class:`Forwarder` receives its store, data keys, audit recorder,
allowlist and outbound client in its constructor; it never reaches into another
service.
"""
