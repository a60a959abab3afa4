"""Reading or exporting an audit log is itself recorded, in the zone's admin log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cardvault.audit import AuditLog, verify_log
from cardvault.cli.audit import app


def make_log(zone: Path) -> Path:
    async def go() -> None:
        log = await AuditLog.open(zone)
        await log.append(
            "service.start",
            actor="vault",
            origin="local",
            object_id=None,
            result="ok",
            request_id=None,
        )
        await log.close()

    asyncio.run(go())
    return zone / "audit.jsonl"


def actions(log: Path) -> list[str]:
    return [json.loads(line)["action"] for line in log.read_text().splitlines()]


def test_export_and_verify_are_recorded_in_the_admin_log(tmp_path: Path) -> None:
    log = make_log(tmp_path / "vault")
    before = log.read_bytes()
    runner = CliRunner()
    assert (
        runner.invoke(app, ["export", str(log), "--out", str(tmp_path / "x.jsonl")]).exit_code == 0
    )
    assert runner.invoke(app, ["verify", str(log)]).exit_code == 0
    admin = tmp_path / "vault-admin" / "audit.jsonl"
    assert [a for a in actions(admin) if not a.startswith("audit.checkpoint")] == [
        "audit.exported",
        "audit.verified",
    ]
    assert verify_log(
        admin, admin.with_name("audit.pub"), head_path=admin.with_name("audit.head")
    ).ok
    assert log.read_bytes() == before  # the log being read is not written to


def test_an_export_that_cannot_be_recorded_is_refused(tmp_path: Path) -> None:
    log = make_log(tmp_path / "vault")
    (tmp_path / "vault-admin").write_text("not a directory")
    result = CliRunner().invoke(app, ["export", str(log)])
    assert result.exit_code == 1
    assert "service.start" not in result.output


def test_a_path_or_user_name_the_record_could_not_hold_is_recorded_as_untrusted_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator chose both: a directory named with a (published test) card number and
    # a user name with a newline. Recording them as given raised ValueError (a traceback).
    log = make_log(tmp_path / "x" / "4242424242424242" / "vault")
    monkeypatch.setenv("LOGNAME", "eve\nadmin")
    outcome = CliRunner().invoke(app, ["verify", str(log)], env={"COLUMNS": "200"})
    assert outcome.exit_code == 0, outcome.output
    admin = log.parent.with_name("vault-admin") / "audit.jsonl"
    (verified,) = [
        json.loads(line)
        for line in admin.read_text().splitlines()
        if json.loads(line)["action"] == "audit.verified"
    ]
    assert verified["actor"] == "os-user:eve?admin"
    assert verified["object"].endswith("/x/[card number]/vault/audit.jsonl")
    assert "4242424242424242" not in admin.read_text()
