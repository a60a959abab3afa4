"""The recorder reports its log failing closed once per failure (the vault writes its
``audit.failed_closed`` events from that report)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from cardvault.audit import AuditUnavailable
from cardvault.audit.recorder import Recorder
from cardvault.errors import AuditUnavailableError


class FailingLog:
    """An audit log whose writes fail; ``failing_since`` marks the current failure."""

    def __init__(self) -> None:
        self.closed = False
        self.broken: BaseException | None = None
        self.failing_since: float | None = None

    async def append(self, action: str, **_: Any) -> None:
        if self.failing_since is not None:
            raise AuditUnavailable("disk full")

    async def close(self) -> None:
        self.closed = True


def test_each_failure_is_reported_once_with_its_kind() -> None:
    reports: list[str] = []

    async def report(reason: str) -> None:
        reports.append(reason)

    async def main() -> None:
        log = FailingLog()
        recorder = Recorder(log)  # type: ignore[arg-type]
        recorder.on_failed_closed = report
        await recorder.record("payment_method.created", actor="key_1")  # works: no report
        log.failing_since = 1.0
        for _ in range(3):
            with pytest.raises(AuditUnavailableError):
                await recorder.record("payment_method.created", actor="key_1")
        await asyncio.sleep(0)
        assert reports == ["write_failed"]
        # Mended, then failing again, for good this time: a second failure.
        log.failing_since = None
        await recorder.record("payment_method.created", actor="key_1")
        log.failing_since, log.broken = 2.0, OSError("gone")
        with pytest.raises(AuditUnavailableError):
            await recorder.record("payment_method.created", actor="key_1")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert reports == ["write_failed", "broken"]


def test_a_report_that_fails_is_logged_and_the_refusal_stands() -> None:
    async def report(_reason: str) -> None:
        raise RuntimeError("the store is down too")

    async def main() -> None:
        log = FailingLog()
        log.failing_since = 1.0
        recorder = Recorder(log)  # type: ignore[arg-type]
        recorder.on_failed_closed = report
        with pytest.raises(AuditUnavailableError):
            await recorder.record("payment_method.created", actor="key_1")
        await asyncio.sleep(0.01)

    with capture_logs() as logs:
        asyncio.run(main())
    events = [line["event"] for line in logs]
    assert "the audit log's failure could not be reported" in events


def test_a_closed_log_reports_nothing() -> None:
    reports: list[str] = []

    async def report(reason: str) -> None:
        reports.append(reason)

    async def main() -> None:
        log = FailingLog()
        log.failing_since, log.closed = 1.0, True
        recorder = Recorder(log)  # type: ignore[arg-type]
        recorder.on_failed_closed = report
        with pytest.raises(AuditUnavailableError):
            await recorder.record("service.stop", actor="vault")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert reports == []
