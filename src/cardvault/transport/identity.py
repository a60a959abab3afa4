"""The verified identity of a mutual-TLS peer, and authorization by it.

The TLS layer (:mod:`cardvault.transport.server`) has already verified the client's
certificate chain against the deployment CA before any byte of HTTP is read; each
connection's protocol (:mod:`cardvault.transport.protocol`) puts the certificate's
``spiffe://cardvault/<identity>`` URI SAN into the ASGI scope as
``scope["extensions"]["tls"]["client_identity"]``. Endpoints authorize by that name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from cardvault.errors import ClientCertificateRequired, IdentityNotAllowed
from cardvault.transport.certs import IDENTITY_PREFIX

__all__ = ["identity_from_peercert", "peer_identity", "require_identity"]


def identity_from_peercert(peercert: Mapping[str, Any] | None) -> str | None:
    """The service identity named by a verified peer certificate, if it names exactly one.

    ``peercert`` is what ``SSLObject.getpeercert()`` returns after verification.
    """
    if not peercert:
        return None
    uris = [
        value
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and isinstance(value, str) and value.startswith(IDENTITY_PREFIX)
    ]
    # A certificate that claims two identities is ambiguous; treat it as none.
    if len(uris) != 1:
        return None
    name = uris[0][len(IDENTITY_PREFIX) :]
    return name or None


def peer_identity(scope: Mapping[str, Any]) -> str | None:
    """The verified client identity of the connection this request came on, or None."""
    tls = scope.get("extensions", {}).get("tls") or {}
    identity = tls.get("client_identity")
    return identity if isinstance(identity, str) else None


def require_identity(scope: Mapping[str, Any], allowed: Collection[str]) -> str:
    """The caller's identity when it is in ``allowed``.

    Raises :class:`ClientCertificateRequired` (401) when the connection has no verified
    identity and :class:`IdentityNotAllowed` (403) when it has another one.
    """
    identity = peer_identity(scope)
    if identity is None:
        raise ClientCertificateRequired()
    if identity not in allowed:
        raise IdentityNotAllowed()
    return identity
