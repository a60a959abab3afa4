"""A simulated acquirer: the allowlisted payment provider of cardvault's demos and tests.

    ************************************************************************************
    *  THIS IS A TEST SIMULATOR, NOT AN ACQUIRER.                                      *
    *                                                                                  *
    *  It writes every request it receives, card numbers and CVCs included, to         *
    *  ``STATE/received.jsonl`` (mode 0600), and with ``--record-api`` serves that     *
    *  file back at ``GET /v1/received``. Recording exactly what left the vault is     *
    *  the whole point: tests use it to see that the real number arrived where the     *
    *  allowlist sent it. A real acquirer is out of scope for cardvault; never point   *
    *  real card data at this process, and never run it outside a test environment.    *
    ************************************************************************************

It sits *outside* cardvault's zones (see DESIGN.md, "Trust zones and processes") and
shares no credentials with them. It does reuse cardvault's transport layer, so it passes
the same TLS checks as the vault (Mozilla intermediate or modern profile, HSTS and the
other security headers on every response), and cardvault's logging, whose scrubber
removes card numbers from every log line. Its own code never logs request bodies.

Endpoints:

``POST /v1/authorizations``
    JSON or ``application/x-www-form-urlencoded`` (``card[number]`` bracket names).
    Answers 200 (approved), 402 (declined) or 400 (malformed). See :mod:`.rules`.
``GET /healthz``
    ``{"status": "ok"}``.
``GET /v1/received`` (only with ``--record-api``; 404 otherwise)
    Test aid: the recorded requests, card numbers included.
``--redirect-path PATH`` (off unless given)
    Test aid: answers 302 to the ``Location`` in the ``to`` query parameter, so tests
    can check that the vault never follows a redirect.
``--echo-card`` / request header ``X-Acquirer-Echo: card``
    Test aid: the authorization response carries the card number it received in
    ``"echo"`` (and with ``X-Acquirer-Echo: header`` in an ``X-Acquirer-Card`` response
    header), so tests can check that the vault redacts what a provider echoes back.

Run it with ``python -m examples.acquirer ...`` from the repository root, or with
``python examples/acquirer/__main__.py ...`` from anywhere.
"""

from __future__ import annotations

from .service import AcquirerSettings, build_acquirer_app

__all__ = ["AcquirerSettings", "build_acquirer_app"]
