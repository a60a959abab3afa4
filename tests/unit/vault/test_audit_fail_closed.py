"""Fail closed: when the audit record cannot be written, the operation is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from cardvault.audit import AuditLog, AuditUnavailable

from .test_idempotency import FORM, make


class BrokenLog:
    """An audit log whose disk has gone away."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    async def append(self, action: str, **_: Any) -> None:
        self.attempts.append(action)
        raise AuditUnavailable("disk full")

    async def close(self) -> None:
        return None


def test_a_card_whose_creation_cannot_be_recorded_is_not_kept(tmp_path: Path) -> None:
    async def main() -> tuple[httpx.Response, list[str], int]:
        service, secret, client = await make(tmp_path)
        broken = BrokenLog()
        service.audit.log = broken  # type: ignore[assignment]
        r = await client.post(
            "/v1/payment_methods", data=FORM, headers={"authorization": f"Bearer {secret}"}
        )
        service.audit.log = None
        listed = await client.get(
            "/v1/payment_methods", headers={"authorization": f"Bearer {secret}"}
        )
        await client.aclose()
        await service.store.close()
        return r, broken.attempts, len(listed.json()["data"])

    r, attempts, stored = asyncio.run(main())
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "audit_unavailable"
    assert "payment_method.created" in attempts
    assert stored == 0


def test_reads_and_deletes_are_refused_when_they_cannot_be_recorded(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int]:
        service, secret, client = await make(tmp_path)
        auth = {"authorization": f"Bearer {secret}"}
        pm = (await client.post("/v1/payment_methods", data=FORM, headers=auth)).json()["id"]
        service.audit.log = BrokenLog()  # type: ignore[assignment]
        read = await client.get(f"/v1/payment_methods/{pm}", headers=auth)
        deleted = await client.delete(f"/v1/payment_methods/{pm}", headers=auth)
        service.audit.log = None
        still_there = await client.get(f"/v1/payment_methods/{pm}", headers=auth)
        await client.aclose()
        await service.store.close()
        return read.status_code, deleted.status_code, still_there.status_code

    assert asyncio.run(main()) == (503, 503, 200)


def test_a_real_log_records_the_operations(tmp_path: Path) -> None:
    async def main() -> list[str]:
        service, secret, client = await make(tmp_path)
        log = await AuditLog.open(tmp_path / "audit")
        service.audit.log = log
        auth = {"authorization": f"Bearer {secret}"}
        pm = (await client.post("/v1/payment_methods", data=FORM, headers=auth)).json()["id"]
        await client.get(f"/v1/payment_methods/{pm}", headers=auth)
        await client.delete(f"/v1/payment_methods/{pm}", headers=auth)
        await client.get("/v1/payment_methods", headers={"authorization": "Bearer sk_test_nope"})
        await log.close()
        await client.aclose()
        await service.store.close()
        import json

        return [
            json.loads(line)["action"]
            for line in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
        ]

    actions = asyncio.run(main())
    assert actions[:4] == [
        "payment_method.created",
        "payment_method.read",
        "payment_method.deleted",
        "auth.failed",
    ]
