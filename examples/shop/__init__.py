"""examples/shop: a primary-zone web shop that holds only ``pm_…`` ids.

The merchant's side of cardvault's picture (DESIGN.md, "Trust zones"): a small web app
with a database of its own. Its checkout page mounts the vault's card element, so the
card goes from the customer's browser straight to the vault and the page gets a
``pm_…`` id; the shop's server pays by asking the vault to forward the card to the
acquirer (an allowlisted destination), and keeps the id, the brand and last four digits,
and the acquirer's answer. It never holds a card number, an expiry or a CVC.

It charges once per order attempt, the pattern merchants should copy (README.md, "Paying
once"): the server renders the checkout with an attempt id, its orders table holds one
order per attempt, the attempt is the forward's Idempotency-Key, and the page disables
Pay from the click until the answer and for good once paid.

It talks to the vault only through the SDK, ``cardvault.client``, and imports nothing
else of cardvault (tests/unit/test_import_boundaries.py checks this): its TLS, headers
and logging are its own, as they would be in a merchant's application.

Layout:

- ``settings.py``: the TOML file and command-line options (the secret key from a file)
- ``orders.py``: the SQLite order store (one order per attempt)
- ``payments.py``: paying for an order through the vault
- ``app.py``: the pages, ``POST /orders``, security headers
- ``cli.py``, ``__main__.py``: start-up; ``templates/``, ``static/``: the pages
"""
