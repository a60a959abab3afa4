"""Reading or exporting an audit log is itself recorded, in the zone's admin log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
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


# -- verify on a full disk (its own record cannot be written) ---------------------------------


def test_a_verification_that_cannot_be_recorded_still_verifies(tmp_path: Path) -> None:
    # Before: verify refused to run (exit 1) when it could not record its own access, so
    # on a full disk the one command that tells whether the log is intact did not run.
    log = make_log(tmp_path / "vault")
    (tmp_path / "vault-admin").write_text("not a directory")
    result = CliRunner().invoke(app, ["verify", str(log)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "could not be recorded" in result.output and "verifying anyway" in result.output


def test_verify_on_a_full_file_system(tmp_path: Path) -> None:
    """The admin log on a real file system that is full (a 64 KiB tmpfs, filled)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    log = make_log(tmp_path / "vault")
    admin = tmp_path / "vault-admin"
    admin.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(admin)], check=True)
    try:
        with contextlib.suppress(OSError), (admin / "filler").open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        full = CliRunner().invoke(app, ["verify", str(log)], env={"COLUMNS": "200"})
        assert full.exit_code == 0, full.output
        assert "verifying anyway" in full.output
        # An export, which hands the records out, is refused when it cannot be recorded.
        refused = CliRunner().invoke(app, ["export", str(log)])
        assert refused.exit_code == 1
        assert "service.start" not in refused.output
    finally:
        subprocess.run(["umount", str(admin)], check=True)


def test_reading_a_workers_log_is_recorded_in_the_vaults_admin_log(tmp_path: Path) -> None:
    log = make_log(tmp_path / "vault" / "w1")
    assert CliRunner().invoke(app, ["verify", str(log)]).exit_code == 0
    assert not (tmp_path / "vault" / "w1-admin").exists()
    admin = tmp_path / "vault-admin" / "audit.jsonl"
    assert "audit.verified" in actions(admin)
