"""What the services call: an audit record for the request being handled, fail-closed;
and the watch that stops a service whose audit log failed.

``Recorder.record`` fills in the request id and origin address from the request's
logging context (bound by :class:`cardvault.transport.asgi.SecurityHeaders`), appends
the record, and turns :class:`AuditUnavailable` into the API's
:class:`~cardvault.errors.ServiceUnavailable`, so the operation it guards is refused.
The first refusal of each failure (a failure lasts from a failed write to the next
write that succeeds) is also handed to :attr:`Recorder.on_failed_closed`, in a task of
its own: the vault writes its ``audit.failed_closed`` event there.

:func:`watch_audit_log` runs beside a service. While the log's last write failed, the
service is not ready (``/readyz``) and refuses what it cannot record (503); when the log
is broken (it could not be cut back after a failed write, or ``audit.head`` could not be
replaced), or has failed for :data:`AUDIT_FAILURE_GRACE` seconds with no write
succeeding since, the watch logs why and asks the service to stop, which then exits
with :data:`AUDIT_FAILED_EXIT` so that its supervisor (systemd's
``Restart=on-failure``, ``cardvault up``) starts it again: a restart re-checks the log
from disk, and one that still cannot write refuses to start instead of answering 503
for ever.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

from cardvault.audit.errors import AuditError, AuditUnavailable
from cardvault.audit.log import AuditLog
from cardvault.audit.record import DetailValue
from cardvault.config import AuditSettings
from cardvault.errors import AuditUnavailableError, ConfigurationError
from cardvault.logging import get_logger, request_fields

__all__ = [
    "AUDIT_FAILED_EXIT",
    "AUDIT_FAILURE_GRACE",
    "Recorder",
    "open_audit_log",
    "start_recording",
    "watch_audit_log",
]

#: The exit status of a service that stopped because its audit log failed: 74, EX_IOERR
#: in sysexits.h ("an error occurred while doing I/O on some file"). Distinct from 1 (an
#: unexpected error), 2 (a configuration error, or a log it refuses to continue) and 3
#: (uvicorn's start-up failure).
AUDIT_FAILED_EXIT: Final = 74
#: Seconds a log may keep failing (no write succeeding since the first failure) before
#: the service stops; a broken log stops it at once.
AUDIT_FAILURE_GRACE: Final = 5.0

_log = get_logger("cardvault.audit")


class Recorder:
    def __init__(self, log: AuditLog | None) -> None:
        self.log = log
        #: Called with ``"write_failed"`` or ``"broken"`` at the first refusal of each
        #: failure of the log (module docstring); it must not record in this log.
        self.on_failed_closed: Callable[[str], Coroutine[Any, Any, None]] | None = None
        self._reported: float | None = None
        self._reports: set[asyncio.Task[None]] = set()

    def _refused(self, action: str) -> None:
        """An operation refused because its record cannot be written: logged, and the
        failure reported once (:attr:`on_failed_closed`)."""
        _log.error("audit log unavailable; refusing the operation", action=action)
        log, report = self.log, self.on_failed_closed
        if log is None or report is None or log.closed:
            return
        since = log.failing_since
        if since is None or since == self._reported:
            return
        self._reported = since
        reason = "broken" if log.broken is not None else "write_failed"
        # A context of its own: the report is no part of the request refused.
        task = asyncio.get_running_loop().create_task(report(reason), context=contextvars.Context())
        self._reports.add(task)
        task.add_done_callback(self._reported_done)

    def _reported_done(self, task: asyncio.Task[None]) -> None:
        self._reports.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error(
                "the audit log's failure could not be reported", error=repr(task.exception())
            )

    async def record(
        self,
        action: str,
        *,
        actor: str,
        object_id: str | None = None,
        result: str = "ok",
        detail: Mapping[str, DetailValue] | None = None,
        origin: str | None = None,
    ) -> None:
        """Append one record; raise ServiceUnavailable (503) when it cannot be written."""
        if self.log is None:
            return
        context = request_fields()
        try:
            await self.log.append(
                action,
                actor=actor,
                origin=origin if origin is not None else context.get("origin"),
                object_id=object_id,
                result=result,
                request_id=context.get("request_id"),
                detail=detail or {},
            )
        except AuditUnavailable as exc:
            self._refused(action)
            raise AuditUnavailableError() from exc

    def record_soon(
        self,
        action: str,
        *,
        actor: str,
        object_id: str | None = None,
        result: str = "ok",
        detail: Mapping[str, DetailValue] | None = None,
        origin: str | None = None,
    ) -> asyncio.Future[Any] | None:
        """:meth:`record` without waiting (:meth:`AuditLog.append_soon`): the record is
        in the log's next flush, and the future answers once it is durable. Await it
        with :meth:`durable`. None without a log (nothing to wait for). Raises
        ServiceUnavailable (503) at once when the log refuses the record."""
        if self.log is None:
            return None
        context = request_fields()
        try:
            return self.log.append_soon(
                action,
                actor=actor,
                origin=origin if origin is not None else context.get("origin"),
                object_id=object_id,
                result=result,
                request_id=context.get("request_id"),
                detail=detail or {},
            )
        except AuditUnavailable as exc:
            self._refused(action)
            raise AuditUnavailableError() from exc

    async def durable(self, recorded: asyncio.Future[Any] | None, action: str) -> None:
        """Wait for a :meth:`record_soon`; raise ServiceUnavailable (503) when the record
        could not be made durable, as :meth:`record` does."""
        if recorded is None:
            return
        try:
            await recorded
        except AuditUnavailable as exc:
            self._refused(action)
            raise AuditUnavailableError() from exc

    async def close(self) -> None:
        if self.log is not None:
            await self.log.close()

    @property
    def writable(self) -> bool:
        """Whether the log's last write succeeded (and it is open and not broken); True
        for a recorder without a log (it records nothing, as in tests)."""
        return self.log is None or self.log.writable


async def watch_audit_log(
    recorder: Recorder,
    stop: Callable[[str], object],
    *,
    grace: float = AUDIT_FAILURE_GRACE,
    every: float = 0.25,
) -> None:
    """Call ``stop(reason)`` once, and return, when the recorder's log is broken or has
    been failing for ``grace`` seconds (module docstring); return when it is closed."""
    while True:
        await asyncio.sleep(every)
        log = recorder.log
        if log is None:
            continue
        if log.closed:
            return
        since = log.failing_since
        if log.broken is not None:
            reason = f"the audit log is broken: {log.failure}"
        elif since is not None and time.monotonic() - since >= grace:
            reason = f"the audit log has failed for {grace:g} s: {log.failure}"
        else:
            continue
        _log.error(
            "audit log failed; stopping so that a supervisor restarts this service",
            path=str(log.path),
            reason=reason,
            exit_status=AUDIT_FAILED_EXIT,
        )
        stop(reason)
        return


async def open_audit_log(directory: Path, settings: AuditSettings) -> AuditLog:
    """Open a service's audit log at start-up; any problem stops start-up (never silently
    a new chain). A disk that is full or failing is :class:`AuditUnavailableError` (the
    service exits 74 and its supervisor tries again: space may come back); anything
    else, a log it refuses or a directory it may not use, is a
    :class:`ConfigurationError` (exit 2: an operator must act)."""
    try:
        return await AuditLog.open(
            directory,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_interval=float(settings.checkpoint_interval),
        )
    except AuditUnavailable as exc:
        if _transient(exc):
            raise AuditUnavailableError(
                f"cannot open the audit log in {directory}: {exc} ({exc.__cause__})"
            ) from exc
        raise ConfigurationError(f"cannot open the audit log in {directory}: {exc}") from exc
    except AuditError as exc:
        raise ConfigurationError(f"cannot open the audit log in {directory}: {exc}") from exc


#: I/O errors that waiting may mend: a full disk or quota, a failing device.
_TRANSIENT_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def _transient(exc: BaseException) -> bool:
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _TRANSIENT_ERRNOS:
            return True
        cause = cause.__cause__
    return False


async def start_recording(
    recorder: Recorder,
    settings: AuditSettings,
    store_url: str,
    *,
    actor: str,
    records: list[tuple[str, Mapping[str, DetailValue]]],
) -> None:
    """A service's start-up: open its audit log (in ``settings``' directory, or the
    SQLite store's) into ``recorder`` and append ``records`` (action, detail), each by
    ``actor`` from the local host. A log whose tail does not verify stops start-up
    (:class:`ConfigurationError`): the chain must never fork silently."""
    directory, _admin = settings.resolved(store_url)
    recorder.log = await open_audit_log(directory, settings)
    for action, detail in records:
        await recorder.record(action, actor=actor, origin="local", detail=detail)
