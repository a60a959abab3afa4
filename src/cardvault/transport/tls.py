"""TLS contexts for every cardvault listener and client.

Python's default server context fails Mozilla's server-side TLS recommendations (it
offers CBC-SHA256/384 suites and the X448 and secp521r1 groups), so every setting that
matters is made explicitly here:

``intermediate`` (default)
    TLS 1.2 and 1.3; for 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
    (no CBC, no RSA key transport, no DHE); groups X25519, P-256, P-384.
``modern``
    TLS 1.3 only (its three AEAD suites); the same groups.

Both: no compression, no renegotiation, no session tickets (a ticket key that never
rotates would undo forward secrecy), and the client picks among our suites, all of which
are strong (Mozilla's advice for these profiles).

Python 3.11's ``ssl`` can set only one ECDH curve. To offer X25519 *and* the NIST curves
the group list is set through OpenSSL's ``SSL_CTX_ctrl(SSL_CTRL_SET_GROUPS_LIST)``; if
that is unavailable the context falls back to P-256 alone, which also passes both
profiles, and says so in the log.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from pathlib import Path
from typing import Literal

__all__ = [
    "GROUPS",
    "INTERMEDIATE_CIPHERS",
    "TlsProfile",
    "client_context",
    "server_context",
]

TlsProfile = Literal["intermediate", "modern"]

# Mozilla intermediate v5.7, ECDHE only. The DHE suites Mozilla also lists need a
# 2048-bit DH group file; ECDHE is what every supported client uses.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
GROUPS = "X25519:P-256:P-384"

_SSL_CTRL_SET_GROUPS_LIST = 92
_log = logging.getLogger(__name__)


def _set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Limit the key-exchange groups. Returns False when only the fallback was possible."""
    setter = getattr(ctx, "set_groups", None)  # Python 3.15+ has it natively.
    if setter is not None:
        setter(groups)
        return True
    if sys.implementation.name == "cpython":
        try:
            import _ssl

            lib = ctypes.CDLL(_ssl.__file__)
            ssl_ctx_ctrl = lib.SSL_CTX_ctrl
            ssl_ctx_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
            ssl_ctx_ctrl.restype = ctypes.c_long
            # CPython's PySSLContext starts with PyObject_HEAD followed by the SSL_CTX
            # pointer; this layout has been stable since the module was written.
            ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
            if ptr and ssl_ctx_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) == 1:
                return True
        except (OSError, AttributeError, ImportError):
            pass
    ctx.set_ecdh_curve("prime256v1")
    _log.warning("tls: could not set the group list; offering P-256 only")
    return False


def server_context(
    cert_file: Path | str,
    key_file: Path | str,
    *,
    profile: TlsProfile = "intermediate",
    client_ca_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A server context for ``profile``; with ``client_ca_file`` it requires a client
    certificate issued by that CA (mutual TLS), and a handshake without one fails."""
    if profile not in ("intermediate", "modern"):
        raise ValueError(f"unknown TLS profile {profile!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if profile == "modern" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    # OP_NO_TICKET stops stateless tickets only: in TLS 1.3 OpenSSL then issues two
    # stateful ones per handshake unless told to issue none.
    ctx.num_tickets = 0
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    _set_groups(ctx, GROUPS)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    # A server context asks for no client certificate unless told to (a public listener).
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca_file))
    return ctx


def client_context(
    ca_bundle: Path | str | None = None,
    *,
    minimum: TlsProfile = "intermediate",
    client_cert: tuple[Path | str, Path | str] | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and hostname, always.

    ``ca_bundle`` replaces the system trust store (pinning a deployment CA); without it
    the system store is used. ``minimum="modern"`` refuses servers without TLS 1.3.
    ``client_cert`` is ``(cert_file, key_file)`` for mutual TLS. There is no parameter
    that turns verification off.
    """
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_bundle) if ca_bundle is not None else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if minimum == "modern" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Reject certificates that violate the X.509 profile (a CA without key usage,
    # missing AKI, …), as Python 3.13 does by default.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return ctx
