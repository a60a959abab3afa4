"""The key service's "try again later" answers, in process: sealed, its audit log broken,
its database full. Each is a 503 with its own code and ``Retry-After``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from cardvault.audit import AuditUnavailable
from cardvault.audit.recorder import Recorder
from cardvault.keyservice.http import routes
from cardvault.keyservice.service import KeyService, initialize
from cardvault.storage import SQLiteKeyStore
from cardvault.transport.asgi import build_app

from .test_http import as_, with_identity


class BrokenLog:
    async def append(self, action: str, **_: Any) -> None:
        raise AuditUnavailable("disk full")

    async def close(self) -> None:
        return None


def test_sealed_broken_audit_and_full_store_are_503s_with_retry_after(tmp_path: Path) -> None:
    async def main() -> dict[str, httpx.Response]:
        store = SQLiteKeyStore(tmp_path / "keyd.db")
        shares = await initialize(store, shares=3, threshold=2)
        recorder = Recorder(None)
        service = KeyService(store, audit=recorder)
        await service.start()
        for share in shares[:2]:
            await service.submit_share(share.to_text(), actor="admin")
        app = build_app(
            routes(service, vault=["vault"], admin=["admin"]), service="test", security_txt=None
        )
        answers: dict[str, httpx.Response] = {}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=with_identity(app)), base_url="https://keyd.test"
        ) as client:
            # Its database full: a rotation cannot store the new KEK version.
            conn = store._conn
            assert conn is not None
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {int(pages)}")
            for _ in range(50):
                r = await client.post("/v1/keys/pan/rotate", headers=as_("admin"))
                if r.status_code != 200:
                    break
            answers["full"] = r
            # The version that could not be stored is not used: the ring's newest is
            # the newest stored, and a data key is wrapped under it.
            stored = max(k.version for k in await store.list_keks() if k.name == "pan")
            assert service.status()["keys"]["pan"]["latest_version"] == stored
            issued = await client.post("/v1/keys/pan/datakey", headers=as_("vault"))
            assert issued.json()["key_version"] == stored
            conn.execute("PRAGMA max_page_count = 4294967294")
            rotated = await client.post("/v1/keys/pan/rotate", headers=as_("admin"))
            assert rotated.status_code == 200
            assert rotated.json()["latest_version"] == stored + 1
            # Its audit log broken: a data key whose issue cannot be recorded is refused.
            recorder.log = BrokenLog()  # type: ignore[assignment]
            answers["audit"] = await client.post("/v1/keys/pan/datakey", headers=as_("vault"))
            recorder.log = None
            # Sealed.
            await service.seal(actor="admin")
            answers["sealed"] = await client.post("/v1/keys/pan/datakey", headers=as_("vault"))
        await store.close()
        return answers

    answers = asyncio.run(main())
    expected = {
        "full": ("storage_full", "30"),
        "audit": ("audit_unavailable", "5"),
        "sealed": ("keyservice_sealed", "30"),
    }
    for name, (code, retry_after) in expected.items():
        r = answers[name]
        assert r.status_code == 503, (name, r.text)
        assert r.json()["error"]["code"] == code, name
        assert r.headers["retry-after"] == retry_after, name
