"""The audit log: hash-chained, signed, append-only; one per service.

Both services (the vault and the key service) keep their own log in their own state
directory and call the same API::

    log = await AuditLog.open(state_dir)            # AuditCorrupt: refuse to start
    record = await log.append(
        "keyservice.datakey.unwrap",
        actor="spiffe://cardvault/vault",          # a key id or certificate identity
        origin="10.0.0.7",
        object_id="dk_1a2b3c",
        result="ok",
        request_id="req_x1",
        detail={"kek_version": 3},
    )                                               # AuditUnavailable: refuse the operation (503)
    await log.close()                               # signs the head

Fail closed: ``append`` returns only once the record is fsynced, and raises
:class:`AuditUnavailable` when it cannot be; the service must then refuse the operation.
Records never hold card data, key material or secrets: ``append`` raises ``ValueError``
before writing one that looks as if it does (:mod:`cardvault.audit.text`).

``verify_log`` checks a log (``cardvault audit verify``) and ``export`` reads it. The
modules:

* :mod:`cardvault.audit.record`: the record, its hash and its line (the format);
* :mod:`cardvault.audit.text`: what a record may hold (``check_entry``), and
  ``untrusted_text`` for text a caller chose;
* :mod:`cardvault.audit.signing`: the signing key and the checkpoint signature;
* :mod:`cardvault.audit.logfile`: the files' names, and the log's file (locked append,
  fsync, cut back);
* :mod:`cardvault.audit.tailfile`: ``audit.tail``, the service's MAC-ed mark of where its
  log ends;
* :mod:`cardvault.audit.opening`: the check of the log before a service continues it;
* :mod:`cardvault.audit.repair`: ``cardvault audit repair``, which makes a refused log
  continuable again and records what it did;
* :mod:`cardvault.audit.log`: the writer, :class:`AuditLog` (chain, group commit,
  checkpoints);
* :mod:`cardvault.audit.verify`: what verification can and cannot find, and ``export``;
* :mod:`cardvault.audit.recorder`: what the services call (fail closed, as a 503);
* :mod:`cardvault.audit.errors`: the exceptions.

The operator's view is ``docs/audit.md``.
"""

from __future__ import annotations

from cardvault.audit.errors import AuditCorrupt, AuditError, AuditUnavailable
from cardvault.audit.log import (
    CHECKPOINT_EVERY,
    CHECKPOINT_INTERVAL,
    HEAD_FILE,
    LOG_FILE,
    TAIL_FILE,
    AuditLog,
)
from cardvault.audit.record import CHECKPOINT_ACTION, GENESIS, AuditRecord, DetailValue
from cardvault.audit.signing import KEY_FILE, PUBLIC_KEY_FILE
from cardvault.audit.verify import Problem, ProblemKind, VerifyResult, export, verify_log

__all__ = [
    "CHECKPOINT_ACTION",
    "CHECKPOINT_EVERY",
    "CHECKPOINT_INTERVAL",
    "GENESIS",
    "HEAD_FILE",
    "KEY_FILE",
    "LOG_FILE",
    "PUBLIC_KEY_FILE",
    "TAIL_FILE",
    "AuditCorrupt",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditUnavailable",
    "DetailValue",
    "Problem",
    "ProblemKind",
    "VerifyResult",
    "export",
    "verify_log",
]
