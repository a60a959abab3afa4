"""What the services call: an audit record for the request being handled, fail-closed.

``Recorder.record`` fills in the request id and origin address from the request's
logging context (bound by :class:`cardvault.transport.asgi.SecurityHeaders`), appends
the record, and turns :class:`AuditUnavailable` into the API's
:class:`~cardvault.errors.ServiceUnavailable`, so the operation it guards is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cardvault.audit.errors import AuditError, AuditUnavailable
from cardvault.audit.log import AuditLog
from cardvault.audit.record import DetailValue
from cardvault.config import AuditSettings
from cardvault.errors import AuditUnavailableError, ConfigurationError
from cardvault.logging import get_logger, request_fields

__all__ = ["Recorder", "open_audit_log", "start_recording"]

_log = get_logger("cardvault.audit")


class Recorder:
    def __init__(self, log: AuditLog | None) -> None:
        self.log = log

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
            _log.error("audit log unavailable; refusing the operation", action=action)
            raise AuditUnavailableError() from exc

    async def close(self) -> None:
        if self.log is not None:
            await self.log.close()


async def open_audit_log(directory: Path, settings: AuditSettings) -> AuditLog:
    """Open a service's audit log at start-up; any problem stops start-up with a
    :class:`ConfigurationError` that says what is wrong (never silently a new chain)."""
    try:
        return await AuditLog.open(
            directory,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_interval=float(settings.checkpoint_interval),
        )
    except AuditError as exc:
        raise ConfigurationError(f"cannot open the audit log in {directory}: {exc}") from exc


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
