"""The import rules of STYLE.md, checked on the source: a forbidden edge fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cardvault"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shop"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py")) if folder.exists() else []


# (the code under this folder, may not import any of these)
RULES = [
    ("vault", ["cardvault.keyservice"]),
    ("keyservice", ["cardvault.vault"]),
    (
        "storage",
        ["starlette", "uvicorn", "httpx", "aiohttp", "cardvault.transport", "cardvault.vault.http"],
    ),
    (
        "cards",
        ["cardvault.transport", "cardvault.storage", "starlette", "httpx", "sqlite3", "asyncpg"],
    ),
    (
        "client",
        ["cardvault.vault", "cardvault.keyservice", "cardvault.storage", "cardvault.crypto"],
    ),
]


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_forbidden_imports(folder: str, forbidden: list[str]) -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in modules_under(SRC / folder)
        for name in imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert offenders == []


def test_only_crypto_imports_hazmat() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in modules_under(SRC)
        if "crypto" not in path.relative_to(SRC).parts[:1]
        for name in imports(path)
        if name.startswith("cardvault.crypto.hazmat")
    ]
    assert offenders == []


#: What the example shop may import of cardvault: the SDK (it talks to the vault through
#: it only) and the shared transport (its listener follows the same TLS profile and limits).
SHOP_MAY_IMPORT = ("cardvault.client", "cardvault.transport")


def test_example_shop_imports_only_the_client_and_the_transport() -> None:
    offenders = [
        f"{path.relative_to(EXAMPLES)} imports {name}"
        for path in modules_under(EXAMPLES)
        for name in imports(path)
        if (name == "cardvault" or name.startswith("cardvault."))
        and not any(name == m or name.startswith(m + ".") for m in SHOP_MAY_IMPORT)
    ]
    assert offenders == []


def test_the_shop_rule_sees_its_real_imports() -> None:
    found = {name for path in modules_under(EXAMPLES) for name in imports(path)}
    assert "cardvault.client" in found
    assert "cardvault.transport.tls" in found
    assert "cardvault.transport.server" in found


def test_the_rules_see_real_imports() -> None:
    # Guard against a rule that passes because it looks at nothing.
    assert "cardvault.transport.asgi" in imports(SRC / "vault" / "app.py")
    assert len(modules_under(SRC / "keyservice")) >= 4
