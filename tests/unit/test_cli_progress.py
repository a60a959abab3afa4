"""The long commands show progress on a terminal and only there; ``--json`` is JSON.

``cardvault scan`` and ``cardvault audit verify`` feed a progress bar on stderr from
the bytes they read. The bar is drawn only when stderr is a terminal (here a
pseudo-terminal), never into a pipe and never with ``--json``; the byte feed adds up to
what was read. Card numbers are generated in the test, never typed.
"""

from __future__ import annotations

import io
import json
import os
import pty
import random
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cardvault.audit import verify_log
from cardvault.cards import luhn_valid
from cardvault.cli.scan import app as scan_app
from cardvault.scan import scan_paths, scan_size
from unit.audit._support import make_log


def _card(rng: random.Random) -> str:
    body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def _on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run ``cardvault ARGS`` with stderr on a pseudo-terminal and stdout on a pipe:
    (exit code, stdout, what the terminal showed)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardvault", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("the command printed nothing for 60 s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    code = proc.wait(timeout=60)
    os.close(leader)
    return code, out, shown.decode(errors="replace")


def test_the_scan_feed_adds_up_to_every_byte_read(tmp_path: Path) -> None:
    rng = random.Random(7)
    (tmp_path / "a.bin").write_bytes(rng.randbytes(3 * 65536 + 17))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("nothing here\n" * 100)
    seen: list[int] = []
    findings = scan_paths([tmp_path], chunk_size=65536, on_bytes=seen.append)
    assert findings == []
    assert sum(seen) == scan_size([tmp_path]) == 3 * 65536 + 17 + 1300
    assert len(seen) > 3  # fed piece by piece, not once at the end


def test_the_verify_feed_adds_up_to_the_log(tmp_path: Path) -> None:
    log = make_log(tmp_path, 40, checkpoint_every=10)
    seen: list[int] = []
    result = verify_log(log, log.with_name("audit.pub"), on_bytes=seen.append)
    assert result.ok
    assert sum(seen) == log.stat().st_size and len(seen) == result.records


def test_scan_json_is_one_object_with_masked_findings(tmp_path: Path) -> None:
    card = _card(random.Random(11))
    (tmp_path / "clean.txt").write_text("nothing\n")
    clean = CliRunner().invoke(scan_app, [str(tmp_path), "--json"])
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout) == {"clean": True, "findings": []}

    (tmp_path / "app.log").write_text(f"charged {card}\n")
    found = CliRunner().invoke(scan_app, [str(tmp_path), "--json"])
    assert found.exit_code == 1
    report = json.loads(found.stdout)
    assert report["clean"] is False
    (finding,) = report["findings"]
    assert finding["path"].endswith("app.log") and finding["kind"] == "card_number"
    assert finding["offset"] == len("charged ")
    assert finding["masked"] == card[:6] + "******" + card[-4:]
    assert card not in found.output


def test_scan_shows_progress_on_a_terminal_and_not_in_json(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(random.Random(3).randbytes(4 << 20))
    code, out, shown = _on_a_terminal(["scan", str(tmp_path)])
    assert code == 0
    assert "scanning" in shown and "clean" in shown
    assert "scanning" not in out  # the bar is on stderr only

    code, out, shown = _on_a_terminal(["scan", str(tmp_path), "--json"])
    assert code == 0 and json.loads(out) == {"clean": True, "findings": []}
    assert "scanning" not in shown


def test_audit_verify_shows_progress_on_a_terminal_and_not_in_json(tmp_path: Path) -> None:
    log = make_log(tmp_path, 30, checkpoint_every=10)
    code, out, shown = _on_a_terminal(["audit", "verify", str(log)])
    assert code == 0, shown
    assert "verifying" in shown
    assert "verifying" not in out

    code, out, shown = _on_a_terminal(["audit", "verify", str(log), "--json"])
    assert code == 0 and json.loads(out)["ok"] is True
    assert "verifying" not in shown


class _Pages:
    """A resource whose ``list_all`` yields ``count`` objects, as the SDK's do."""

    def __init__(self, count: int) -> None:
        self.count = count

    def list_all(self, page_size: int) -> Iterator[dict[str, str]]:
        for i in range(self.count):
            yield {"id": f"pm_{i:04d}"}


def test_list_all_counts_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from cardvault.cli import api

    for terminal in (True, False):
        shown = io.StringIO()
        monkeypatch.setattr(api, "err", Console(file=shown, force_terminal=terminal, width=100))
        items = api._page(_Pages(250), None, None, None, True)
        assert [i["id"] for i in items] == [f"pm_{i:04d}" for i in range(250)]
        assert ("listing" in shown.getvalue()) is terminal
