"""A SoftHSM2 token of the test session's own, for the PKCS#11 seal.

SoftHSM2 (Debian's ``softhsm2``, installed by scripts/test) keeps its tokens in the
directory its configuration file names; ``SOFTHSM2_CONF`` picks the file. The session
gets a fresh token directory and points ``SOFTHSM2_CONF`` at it, in this process (the
PKCS#11 module is loaded once per process) and so in every process it starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cardvault.files import write_private

MODULE_PATHS = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    label: str
    pin_file: Path
    wrong_pin_file: Path

    def seal_settings(self, *, pin_file: Path | None = None) -> str:
        """The ``[seal]`` table's PKCS#11 lines (without the table header or the type)."""
        return (
            f'pkcs11_module = "{self.module}"\n'
            f'pkcs11_token_label = "{self.label}"\n'
            f'pkcs11_pin_file = "{pin_file or self.pin_file}"\n'
        )


def find_module() -> Path | None:
    if shutil.which("softhsm2-util") is None:
        return None
    return next((path for path in MODULE_PATHS if path.is_file()), None)


def make_token(directory: Path) -> SoftHsm:
    """A fresh token in ``directory``; sets SOFTHSM2_CONF for this process and its children."""
    module = find_module()
    assert module is not None
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    label = f"cardvault-test-{secrets.token_hex(3)}"
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    pin_file, wrong = directory / "pin", directory / "wrong-pin"
    write_private(pin_file, pin.encode() + b"\n")
    write_private(wrong, secrets.token_hex(8).encode())
    return SoftHsm(module, label, pin_file, wrong)
