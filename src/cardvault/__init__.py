"""cardvault: a self-hosted card-data environment.

Card numbers are encrypted at rest with AES-256 under data keys that a separate key
service hands out over mutual TLS; no internal server can read a card number, it can
only ask the vault to send a card to a provider on a static allowlist.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
