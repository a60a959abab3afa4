"""The command line as a Stripe CLI user expects it: ``--version``, shell completion,
and help that shows what to type (no ``<bool>`` after a flag that takes no value)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cardvault import __version__


def cardvault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def test_version_flag_and_command() -> None:
    assert cardvault("--version").stdout.strip() == f"cardvault {__version__}"
    assert cardvault("version").stdout.strip() == __version__


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["scan"],
        ["keys", "reencrypt"],
        ["keys", "status"],
        ["payment-methods", "create"],
        ["payment-methods", "list"],
        ["api-keys", "create"],
        ["audit", "verify"],
        ["doctor", "tls"],
        ["up"],
        ["post"],
        ["import"],
    ],
    ids=lambda c: " ".join(c) or "cardvault",
)
def test_help_shows_no_type_after_a_flag(command: list[str]) -> None:
    result = cardvault(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout
    assert "<list[" not in result.stdout
    assert "--help" in result.stdout


def test_a_flag_given_a_value_is_refused_with_a_usage_error() -> None:
    result = cardvault("keys", "status", "--json", "true")
    assert result.returncode == 2


def test_shell_completion_completes_commands() -> None:
    script = cardvault("--show-completion", "bash")
    assert script.returncode == 0
    assert "_cardvault_completion" in script.stdout
    done = cardvault(
        env={
            "_CARDVAULT_COMPLETE": "complete_bash",
            "COMP_WORDS": "cardvault doc",
            "COMP_CWORD": "1",
        }
    )
    assert done.stdout.split() == ["doctor"]
