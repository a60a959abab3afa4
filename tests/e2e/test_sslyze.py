"""sslyze, a standard TLS scanner, checks the live vault listener against Mozilla's
server-side TLS profiles ("intermediate" by default, "modern" when selected)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cardvault.transport.asgi import HSTS
from conftest import VaultProcess, running_vault
from helpers import ROOT, Pki


def sslyze_binary() -> str:
    candidates = [
        os.environ.get("CARDVAULT_SSLYZE"),
        str(ROOT / ".venv-tools/bin/sslyze"),
        shutil.which("sslyze"),
    ]
    for c in candidates:
        if c and Path(c).exists():
            return c
    # Not a skip: the README's test command installs sslyze, so its absence is a failure.
    pytest.fail("sslyze not found: run scripts/test (it installs sslyze into .venv-tools)")


def scan(port: int, pki: Pki, config: str, out: Path) -> tuple[int, dict[str, object], str]:
    proc = subprocess.run(
        [
            sslyze_binary(),
            f"--mozilla_config={config}",
            f"--certinfo_ca_file={pki.ca_file}",
            "--http_headers",
            f"--json_out={out}",
            f"localhost:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def hsts_header(report: dict[str, object]) -> str | None:
    result = report["server_scan_results"][0]["scan_result"]["http_headers"]["result"]  # type: ignore[index]
    hsts = result["strict_transport_security_header"]
    if hsts is None:
        return None
    parts = [f"max-age={hsts['max_age']}"]
    if hsts["include_subdomains"]:
        parts.append("includeSubDomains")
    if hsts["preload"]:
        parts.append("preload")
    return "; ".join(parts)


@pytest.mark.slow
def test_vault_listener_is_compliant_with_mozilla_intermediate(
    vault: VaultProcess, pki: Pki, tmp_path: Path
) -> None:
    code, report, output = scan(vault.port, pki, "intermediate", tmp_path / "out.json")
    assert code == 0, output
    assert "OK - Compliant" in output
    assert hsts_header(report) == HSTS


@pytest.mark.slow
def test_vault_listener_is_compliant_with_mozilla_modern_when_selected(
    pki: Pki, tmp_path: Path
) -> None:
    with running_vault(tmp_path, pki, profile="modern") as modern:
        code, report, output = scan(modern.port, pki, "modern", tmp_path / "out.json")
    assert code == 0, output
    assert "OK - Compliant" in output
    assert hsts_header(report) == HSTS


@pytest.mark.slow
def test_intermediate_listener_is_not_reported_modern(
    vault: VaultProcess, pki: Pki, tmp_path: Path
) -> None:
    # The scanner can fail: the default profile keeps TLS 1.2, which "modern" forbids.
    code, _report, output = scan(vault.port, pki, "modern", tmp_path / "out.json")
    assert code != 0, output
