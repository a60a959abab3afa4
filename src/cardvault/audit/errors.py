"""The audit log's own exceptions.

These are library exceptions, not leaves of :mod:`cardvault.errors`: a service catches
:class:`AuditUnavailable` at its boundary and answers ``503`` with
``raise ServiceUnavailable() from exc``, so the cause stays in the service's log.

::

    AuditError
    ├── AuditUnavailable    a record could not be made durable; refuse the operation
    └── AuditCorrupt        the log on disk does not continue a valid chain; refuse to start

A record that would hold card data or key material is a programming error and raises
:class:`ValueError` before anything is written.
"""

from __future__ import annotations

__all__ = ["AuditCorrupt", "AuditError", "AuditUnavailable"]


class AuditError(Exception):
    """Base of the audit log's exceptions."""


class AuditUnavailable(AuditError):
    """The record was not written (disk full, I/O error, log closed or broken).

    The operation it describes must be refused: nothing may happen that the audit log
    does not hold.
    """


class AuditCorrupt(AuditError):
    """The log (or its ``audit.head`` or ``audit.tail``) is not the chain the service
    wrote, or holds records it cannot vouch for.

    Raised when the log is opened, so that a service refuses to start rather than
    continue (and sign) a damaged or tampered log. The message names the problem and
    points to ``cardvault audit repair``; ``kind`` is its name (``edited``,
    ``head_missing``, ``unvouched`` ...) and ``reason`` the problem alone, when known.
    """

    def __init__(self, message: str, *, kind: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
