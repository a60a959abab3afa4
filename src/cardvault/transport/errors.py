"""The exceptions of a connection that could not be made safely.

::

    TransportError       the request could not be completed over the network
    └── PinMismatch      the peer's public key matches none of its pins (transport.pins)

Raised by clients (the SDK, :mod:`cardvault.client`), never rendered as an API error:
a service that meets one answers with a leaf of :mod:`cardvault.errors` instead.
"""

from __future__ import annotations

__all__ = ["TransportError"]


class TransportError(Exception):
    """The request could not be completed over the network (after any retries).

    Certificate failures are transport errors too; the original ``ssl`` error is the
    ``__cause__``. The message never includes request data.
    """
