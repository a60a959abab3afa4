"""The services audit their own TLS on a schedule, into their audit log
(``[tls_audit]``, cardvault.transport.selfaudit)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cardvault.transport.selfaudit import (
    OwnListener,
    TlsAuditSettings,
    certificate_problems,
    run_self_audit,
)
from e2e.test_doctor import listener
from helpers import Pki
from stack import Stack, run_stack, vault_database


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    audit = f'[tls_audit]\ninterval = 3600\nfirst_delay = 0.5\nca_file = "{pki.ca_file}"\n'
    with vault_database("sqlite", tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, "sqlite", dsn, vault_toml=audit)


def records(stack: Stack, action: str) -> list[dict[str, Any]]:
    found = []
    for path in stack.audit_dir.rglob("*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{action}"' in line:
                found.append(json.loads(line))
    return found


def test_the_vault_audits_its_listeners_soon_after_it_starts(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while not records(stack, "tls.audit") and time.monotonic() < deadline:
        time.sleep(0.5)
    (record,) = records(stack, "tls.audit")
    assert record["result"] == "ok", record
    assert record["detail"]["compliant"] == "yes"
    assert "scanned" in record["detail"]["scan"]
    assert record["detail"]["problems"] == ""


def test_a_certificate_near_its_end_is_a_drift_with_a_warning(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = pki.ca.issue("soon", dns=["localhost"], days=12, out_dir=tmp_path)
    recorded: list[dict[str, Any]] = []

    async def record(detail: dict[str, Any]) -> None:
        recorded.append(detail)

    with listener((soon.cert_path, soon.key_path)) as port:
        own = OwnListener("public", "127.0.0.1", port, soon.cert_path, pki.ca_file)
        detail = asyncio.run(run_self_audit("vault", [own], TlsAuditSettings(), record))
    assert recorded == [detail]
    assert detail["compliant"] == "no"
    assert "public: certificate expires in 11 days (under 30): renew it" in detail["problems"]
    # The scan ran too (the listener is otherwise compliant) and added nothing else.
    assert detail["scan"] == "1 listener(s) scanned"
    assert detail["problems"].count("public:") == 1
    captured = capsys.readouterr()
    assert "TLS certificate expires soon" in captured.out + captured.err


def test_certificate_problems_reads_the_file_alone(tmp_path: Path, pki: Pki) -> None:
    good = pki.ca.issue("good", dns=["localhost"], out_dir=tmp_path)
    foreign = pki.rogue.issue("foreign", dns=["localhost"], out_dir=tmp_path)
    expired = pki.ca.issue("old", dns=["localhost"], days=-1, out_dir=tmp_path)
    facts, problems = certificate_problems(good.cert_path, pki.ca_file, 30)
    assert (facts["key"], problems) == ("EC-256", [])
    assert certificate_problems(foreign.cert_path, pki.ca_file, 30)[1] == [
        "certificate not issued by the configured CA"
    ]
    assert certificate_problems(expired.cert_path, None, 30)[1][0].startswith(
        "certificate expired on"
    )
