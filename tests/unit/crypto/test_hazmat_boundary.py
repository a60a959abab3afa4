"""Only cardvault.crypto may import cardvault.crypto.hazmat (STYLE.md, "Crypto")."""

from __future__ import annotations

import ast
from pathlib import Path

import cardvault

SRC = Path(cardvault.__file__).parent
HAZMAT = "cardvault.crypto.hazmat"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                package = path.relative_to(SRC.parent).with_suffix("").parts[: -node.level]
                names.add(".".join([*package, node.module]))
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_hazmat_is_imported_only_by_cardvault_crypto() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if module == "cardvault.crypto" or module.startswith("cardvault.crypto."):
            continue
        if any(name == HAZMAT or name.startswith(HAZMAT + ".") for name in _imported_modules(path)):
            offenders.append(module)
    assert offenders == []


def test_the_boundary_check_would_see_a_hazmat_import() -> None:
    # Guard against a checker that sees nothing: the crypto package itself imports it.
    modules = _imported_modules(SRC / "crypto" / "envelope.py")
    assert HAZMAT in modules
