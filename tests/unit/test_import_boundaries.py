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
        # The stores know nothing of HTTP, of the services above them, or of plaintext
        # card data and keys.
        "storage",
        [
            "starlette",
            "uvicorn",
            "httpx",
            "aiohttp",
            "cardvault.transport",
            "cardvault.vault",
            "cardvault.keyservice",
            "cardvault.cards",
            "cardvault.crypto",
            "cardvault.audit",
            "cardvault.client",
        ],
    ),
    (
        # Pure card logic: no I/O, and its own errors (cards/errors.py), not the API's
        # HTTP error tree; the vault maps one onto the other where it calls card code.
        "cards",
        [
            "cardvault.transport",
            "cardvault.storage",
            "cardvault.errors",
            "starlette",
            "httpx",
            "sqlite3",
            "asyncpg",
        ],
    ),
    (
        "client",
        ["cardvault.vault", "cardvault.keyservice", "cardvault.storage", "cardvault.crypto"],
    ),
    # The command line reaches a service through its API or one admin function of it
    # (cardvault.vault.admin, cardvault.keyservice.app), never its storage.
    ("cli", ["cardvault.storage"]),
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


#: The one library package that is easy to misuse. Only the crypto layer imports it, and
#: the two transport modules that handle X.509, for which ``cryptography`` has no door
#: outside hazmat: certificates and their keys (certs.py), and the SubjectPublicKeyInfo
#: bytes a key pin hashes (pins.py). Everything else signs, verifies and seals through
#: ``cardvault.crypto`` and checks pins through ``cardvault.transport.pins``.
LIBRARY_HAZMAT = "cryptography.hazmat"
LIBRARY_HAZMAT_ALLOWED = ("crypto", "transport/certs.py", "transport/pins.py")


def imported_names(path: Path) -> set[str]:
    """Every absolute module name a file may load, by any of the ways Python offers:
    ``import a.b``, ``from a.b import c`` (both ``a.b`` and ``a.b.c``: ``c`` may be a
    module), and ``importlib.import_module("a.b")`` / ``__import__("a.b")`` with a
    literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func, first = node.func, node.args[0]
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            literal = first.value if isinstance(first, ast.Constant) else None
            if name in ("import_module", "__import__") and isinstance(literal, str):
                found.add(literal)
    return found


def imports_library_hazmat(path: Path) -> bool:
    return any(
        name == LIBRARY_HAZMAT or name.startswith(LIBRARY_HAZMAT + ".")
        for name in imported_names(path)
    )


def hazmat_allowed(relative: Path) -> bool:
    return any(
        relative.parts[:1] == (allowed,) if "/" not in allowed else relative.as_posix() == allowed
        for allowed in LIBRARY_HAZMAT_ALLOWED
    )


def test_only_crypto_and_the_x509_modules_import_cryptography_hazmat() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in modules_under(SRC)
        if not hazmat_allowed(path.relative_to(SRC)) and imports_library_hazmat(path)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source",
    [
        "from cryptography.hazmat.primitives import serialization\n",
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n",
        "from cryptography import hazmat\n",
        "import cryptography.hazmat.primitives.serialization\n",
        "import cryptography.hazmat as h\n",
        "def f():\n    from cryptography.hazmat.primitives import hashes\n",
        "import importlib\nimportlib.import_module('cryptography.hazmat.primitives')\n",
        "__import__('cryptography.hazmat')\n",
    ],
)
def test_the_hazmat_rule_sees_every_form_of_import(tmp_path: Path, source: str) -> None:
    path = tmp_path / "module.py"
    path.write_text(source)
    assert imports_library_hazmat(path)


@pytest.mark.parametrize(
    "source",
    [
        "from cryptography import x509\n",
        "import cryptography.x509\n",
        "from cryptography.exceptions import InvalidTag\n",
        "import hazmat\n",
        "from cardvault.crypto import sign\n",
    ],
)
def test_the_hazmat_rule_lets_other_imports_be(tmp_path: Path, source: str) -> None:
    path = tmp_path / "module.py"
    path.write_text(source)
    assert not imports_library_hazmat(path)


def test_the_hazmat_rule_sees_real_imports() -> None:
    # Guard against a rule that passes because it looks at nothing or allows too much.
    assert imports_library_hazmat(SRC / "crypto" / "hazmat" / "aead.py")
    assert imports_library_hazmat(SRC / "transport" / "certs.py")
    assert imports_library_hazmat(SRC / "transport" / "pins.py")
    assert hazmat_allowed(Path("crypto/hazmat/ed25519.py"))
    assert hazmat_allowed(Path("transport/pins.py"))
    assert not hazmat_allowed(Path("transport/tls.py"))
    assert not hazmat_allowed(Path("cryptography_helpers.py"))
    assert not hazmat_allowed(Path("audit/crypto/signing.py"))
    assert len(modules_under(SRC)) >= 60


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


# -- the vault's rooms (see the docstring of cardvault/vault/__init__.py) ------------------

VAULT = SRC / "vault"
#: Of the storage layer, the vault sees the protocol and its records (storage/base.py)
#: and the package's own face (open_vault_store, in app.py): never an implementation.
VAULT_MAY_IMPORT_OF_STORAGE = ("cardvault.storage", "cardvault.storage.base")
#: The vault's services know nothing of the HTTP server: only http.py, element.py and
#: app.py do. (forwarding/outbound.py is an HTTP *client*: asyncio and httptools.)
VAULT_SERVICES = [
    "accounts.py",
    "payment_methods.py",
    "idempotency.py",
    "params.py",
    "ids.py",
    "datakeys.py",
    "forwarding",
]
HTTP_SERVER = ["starlette", "uvicorn", "cardvault.transport.asgi", "cardvault.vault.http"]


def vault_modules(name: str) -> list[Path]:
    return modules_under(VAULT / name) if (VAULT / name).is_dir() else [VAULT / name]


def test_the_vault_reaches_storage_only_through_its_protocol() -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in modules_under(VAULT)
        for name in imports(path)
        if (name == "cardvault.storage" or name.startswith("cardvault.storage."))
        and name not in VAULT_MAY_IMPORT_OF_STORAGE
    ]
    assert offenders == []


@pytest.mark.parametrize("name", VAULT_SERVICES)
def test_the_vaults_services_know_nothing_of_the_http_server(name: str) -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {imported}"
        for path in vault_modules(name)
        for imported in imports(path)
        if any(imported == f or imported.startswith(f + ".") for f in HTTP_SERVER)
    ]
    assert offenders == []


def test_the_forwarding_package_never_reaches_the_vaults_wiring() -> None:
    # The Forwarder receives its store, data keys and audit recorder; it never looks
    # them up in the app or another service.
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in modules_under(VAULT / "forwarding")
        for name in imports(path)
        if name in ("cardvault.vault.app", "cardvault.vault.http", "cardvault.vault.element")
    ]
    assert offenders == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path) -> list[str]:
    """``from cardvault.a import _b`` and ``cardvault.a._b`` modules: another module's
    private names."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [
            name
            for name in names
            if name.startswith("cardvault.") and any(_private(part) for part in name.split(".")[1:])
        ]
    return found


def test_vault_modules_import_no_private_names() -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in modules_under(VAULT)
        for name in private_imports(path)
    ]
    assert offenders == []


def test_the_vault_rules_see_real_imports(tmp_path: Path) -> None:
    # Guard against rules that pass because they look at nothing.
    assert "cardvault.storage.base" in imports(VAULT / "payment_methods.py")
    assert "cardvault.storage" in imports(VAULT / "app.py")
    assert "starlette.routing" in imports(VAULT / "http.py")
    assert len(vault_modules("forwarding")) >= 6
    assert "cardvault.vault.accounts" in imports(VAULT / "forwarding" / "forwarder.py")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from cardvault.vault.service import _get\n"
        "import cardvault.cards._secret\n"
        "from cardvault import __version__\n"
    )
    assert private_imports(probe) == ["cardvault.vault.service._get", "cardvault.cards._secret"]
