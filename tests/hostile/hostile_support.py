"""What the hostile suite shares: card numbers in every written form, and the check that
none of them is left anywhere the vault writes (its answers, its logs, its audit log and
its database), except the encrypted card itself."""

from __future__ import annotations

import contextlib
import json
import random
import re
import sqlite3
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from cardvault.cards.luhn import digits_of, find_card_numbers
from cardvault.scan import FindingKind, scan_paths
from stack import Stack

__all__ = [
    "CARD_FORMS",
    "OPEN_LIMITS",
    "card_forms",
    "card_numbers_in",
    "leaks_in_stack",
    "luhn_complete",
    "test_card_numbers",
    "vault_rss_mib",
]


#: The vault's [limits] with rate limits out of the way: the suite sends hundreds of
#: requests with one key.
OPEN_LIMITS = (
    "secret_rate = 10000.0\nsecret_burst = 10000.0\n"
    "publishable_rate = 10000.0\npublishable_burst = 10000.0\n"
)


def test_card_numbers() -> list[str]:
    """The published test card numbers the vault ships."""
    text = resources.files("cardvault.cards").joinpath("test_cards.json").read_text()
    return [entry["number"] for entry in json.loads(text)["cards"]]


test_card_numbers.__test__ = False  # type: ignore[attr-defined]


def luhn_complete(payload: str) -> str:
    """``payload`` and the check digit that makes it pass Luhn (numbers generated in
    tests, never typed)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d >= 5 else d * 2
        total += d
    return payload + str(-total % 10)


def _script(number: str, zero: int) -> str:
    return "".join(chr(zero + int(d)) for d in number)


def _grouped(number: str, sep: str) -> str:
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


#: Every form a card number is written in here: ASCII, grouped with spaces, dashes and
#: dots, and other scripts' digits (fullwidth, Arabic-Indic, Devanagari, mixed).
CARD_FORMS = (
    "plain",
    "spaces",
    "dashes",
    "dots",
    "fullwidth",
    "arabic-indic",
    "devanagari",
    "mixed",
)


def card_forms(number: str) -> dict[str, str]:
    return {
        "plain": number,
        "spaces": _grouped(number, " "),
        "dashes": _grouped(number, "-"),
        "dots": _grouped(number, "."),
        "fullwidth": _script(number, 0xFF10),
        "arabic-indic": _script(number, 0x0660),
        "devanagari": _script(number, 0x0966),
        "mixed": number[:6] + _script(number[6:], 0xFF10),
    }


#: A hex token (the audit log's hashes, data-key ids ``dk_`` + 24 hex): its digits are not
#: a number, and random hex holds a run of 20 or more digits often enough to matter.
_HEX_DIGEST = re.compile(r"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{16,}(?![0-9A-Za-z])")


def card_numbers_in(text: str) -> list[str]:
    """The card numbers in ``text``, masked (first six, last four) for messages. Hex
    tokens (16 or more hex characters with a letter among them) are set aside."""
    text = _HEX_DIGEST.sub("#", text)
    out = []
    for match in find_card_numbers(text):
        digits = digits_of(match.group())
        out.append(f"{digits[:6]}…{digits[-4:]}" if len(digits) <= 19 else f"{len(digits)} digits")
    return out


def _json_strings(value: object) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            yield str(item)


def _text_leaks(path: Path) -> list[str]:
    """Card numbers in a text file: in its text, and in the strings of each JSON line
    once decoded (a JSON writer may have escaped other scripts' digits as \\uXXXX)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    found = [f"{path.name}: {n}" for n in card_numbers_in(text)]
    for line in text.splitlines():
        if line.startswith(("{", "[")):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            for s in _json_strings(value):
                found += [f"{path.name} (decoded): {n}" for n in card_numbers_in(s)]
    return found


def _sqlite_leaks(db: Path) -> list[str]:
    """Card numbers in any text column of any table (the ciphertext columns are BLOBs
    and are left to the byte scan, which finds no digit runs in random bytes)."""
    found = []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608
                for value in row:
                    if isinstance(value, str):
                        found += [f"{db.name}:{table}: {n}" for n in card_numbers_in(value)]
    return found


def _postgres_leaks(dsn: str) -> list[str]:
    import asyncio

    import asyncpg

    async def run() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            found = []
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema='public'"
            )
            for (table,) in tables:
                for row in await conn.fetch(f'SELECT * FROM "{table}"'):  # noqa: S608
                    for value in row.values():
                        if isinstance(value, str):
                            found += [f"{table}: {n}" for n in card_numbers_in(value)]
            return found
        finally:
            await conn.close()

    return asyncio.run(run())


def leaks_in_stack(stack: Stack, extra: Iterable[Path] = ()) -> list[str]:
    """Every card number the vault left in the clear: its log and the key service's,
    its audit log, its database's text, and the bytes of every file of its state (in
    ASCII, UTF-16, hex and base64, by :func:`cardvault.scan.scan_paths`)."""
    found: list[str] = []
    for path in (stack.vault_log, stack.keyd_log, *sorted(stack.audit_dir.glob("*")), *extra):
        if path.is_file():
            found += _text_leaks(path)
    if stack.backend == "sqlite":
        found += _sqlite_leaks(stack.db)
    else:
        found += _postgres_leaks(stack.dsn)
    for finding in scan_paths([stack.dir], ignore=["*.pem", "*.key", "root.key"]):
        if finding.kind in (FindingKind.CARD_NUMBER, FindingKind.UNREADABLE):
            found.append(str(finding))
    return found


def vault_rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def random_card(rng: random.Random) -> str:
    """A Luhn-valid number of a common length, generated (never typed)."""
    length = rng.choice([15, 16, 16, 19])
    payload = rng.choice("2345") + "".join(rng.choice("0123456789") for _ in range(length - 2))
    return luhn_complete(payload)
