"""Write the fuzzers' seed corpora and dictionaries (``corpus/<harness>/``, ``dict/``).

Run from the repository root after changing a harness's input format::

    .venv/bin/python tests/fuzz/make_corpus.py

It overwrites the named seeds it makes and leaves other files (inputs that
``bench/fuzz.py --merge`` added, named by their SHA-1) alone. Card numbers are the
published test numbers (read from cardvault's own table); none is typed by hand and
none is generated. The audit lines are made by the audit module
itself, with a fixed signing key and clock, so the output is the same on every run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cardvault.audit import AuditLog

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
DICTS = HERE / "dict"
#: How deep the deep seeds nest.
NEST = 900

# --- card numbers --------------------------------------------------------------------


def test_numbers() -> dict[str, str]:
    """The published test numbers, first of each brand, by brand."""
    table = json.loads(resources.files("cardvault.cards").joinpath("test_cards.json").read_text())
    out: dict[str, str] = {}
    for card in table["cards"]:
        out.setdefault(card["brand"], card["number"])
    return out


def longest_test_number() -> str:
    """The longest published test number (19 digits): the seed for the longest PANs.
    No number is generated onto disk: a Luhn-valid number that is not a published test
    card must never rest in the tree."""
    table = json.loads(resources.files("cardvault.cards").joinpath("test_cards.json").read_text())
    return max((card["number"] for card in table["cards"]), key=len)


def broken(number: str) -> str:
    """``number`` with its last digit changed, so that Luhn fails."""
    last = (int(number[-1]) + 1) % 10
    return number[:-1] + str(last)


def grouped(number: str, sep: str, sizes: tuple[int, ...] = (4, 4, 4, 4, 3)) -> str:
    parts, i = [], 0
    for size in sizes:
        if i >= len(number):
            break
        parts.append(number[i : i + size])
        i += size
    if i < len(number):
        parts.append(number[i:])
    return sep.join(parts)


# --- the seeds -------------------------------------------------------------------------


def params_seeds(cards: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    visa, mc, amex = cards["visa"], cards["mastercard"], cards["amex"]
    card_form = (
        f"type=card&card[number]={visa}&card[exp_month]=12&card[exp_year]=2034&card[cvc]=123"
    )
    forms = {
        "card": card_form,
        "card-billing": card_form
        + "&billing_details[name]=Jenny+Rosen&billing_details[email]=jenny%40example.com"
        "&billing_details[address][line1]=510+Townsend+St&billing_details[address][postal_code]=94103"
        "&billing_details[address][country]=US",
        "card-metadata": card_form
        + "&metadata[order_id]=6735&metadata[note]=caf%C3%A9&metadata[]=",
        "card-encoded": f"type=card&card%5Bnumber%5D={mc}&card%5Bexp_month%5D=01"
        "&card%5Bexp_year%5D=2031&card%5Bcvc%5D=314",
        "card-amex-spaces": f"type=card&card[number]={quote(grouped(amex, ' ', (4, 6, 5)))}"
        "&card[exp_month]=3&card[exp_year]=2030&card[cvc]=1234",
        "expand": "expand[]=customer&expand[]=card.networks&limit=3",
        "list-index": "items[0][price]=price_1&items[0][quantity]=2&items[1][price]=price_2",
        "list-append-hash": "items[][price]=price_1&items[][price]=price_2",
        "nested-4": "a[b][c][d]=e&a[b][c][f]=g",
        "blank": "a&b=&c==&=d&&e=f",
        "bad-utf8": "metadata[x]=%FF%FE&metadata[y]=%E2%82",
        "plus-percent": "metadata[q]=1+1%3D2&metadata[%2B]=%25",
        "forward": "payment_method=pm_1PgT2y2eZvKYlo2C&url=https%3A%2F%2Flocalhost%3A8445%2Fv1%2Fauthorizations"
        "&request[headers][0][name]=Destination-Idempotency-Key&request[headers][0][value]=k1"
        "&request[body]=%7B%22card%22%3A%7B%22number%22%3A%22%7B%7Bcard_number%7D%7D%22%7D%7D"
        "&replacements[]=card_number&replacements[]=card_expiry&replacements[]=card_cvc",
    }
    for name, body in forms.items():
        yield f"form-{name}", b"f" + body.encode()
    yield "form-charset-card", b"F" + card_form.encode()

    card_json = {
        "type": "card",
        "card": {"number": visa, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
    }
    bodies = {
        "card": card_json,
        "card-int-number": {"type": "card", "card": {"number": int(mc), "exp_month": 1}},
        "card-billing": {
            **card_json,
            "billing_details": {"name": "Jenny Rosen", "address": {"country": "US"}},
            # json.dumps writes 😀 as the escaped surrogate pair \ud83d\ude00, as
            # many clients do: one mutation from a lone surrogate.
            "metadata": {"order_id": "6735", "note": "café ☕ 😀"},
        },
        "expand": {"expand": ["customer", "card.networks"], "limit": 3},
        "forward": {
            "payment_method": "pm_1PgT2y2eZvKYlo2C",
            "url": "https://localhost:8445/v1/authorizations",
            "request": {
                "headers": [{"name": "Destination-Idempotency-Key", "value": "k1"}],
                "body": json.dumps({"card": {"number": "{{card_number}}", "cvc": "{{card_cvc}}"}}),
            },
            "replacements": ["card_number", "card_expiry", "card_cvc"],
        },
        "scalars": {"a": None, "b": True, "c": False, "d": 1.5e3, "e": -0, "f": [1, [2, [3]]]},
        "empty": {},
    }
    for name, value in bodies.items():
        yield f"json-{name}", b"j" + json.dumps(value).encode()
    yield "json-escapes", b'j{"a":"\\u00e9\\n\\"\\/","b\\u0000":"x"}'
    yield "json-ascii-false", b"j" + json.dumps(card_json, ensure_ascii=False, indent=1).encode()
    yield "json-charset-card", b"J" + json.dumps(card_json).encode()
    yield "json-not-object", b'j["type", "card"]'
    # Nested 900 deep: near the ~1000 levels where json.loads raises RecursionError, so
    # that one mutation that copies a part of it reaches past them.
    yield "json-deep", b'j{"metadata":' + b"[" * NEST + b"]" * NEST + b"}"

    queries = {
        "list": "limit=10&starting_after=pm_1PgT2y2eZvKYlo2C",
        "expand": "expand[]=data.card&expand%5B%5D=data.billing_details",
        "type": "type=card&customer=cus_9s6XKzkNRiz8i3&ending_before=",
    }
    for name, query in queries.items():
        yield f"query-{name}", b"q" + query.encode()


def cards_seeds(cards: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    visa, mc, amex = cards["visa"], cards["mastercard"], cards["amex"]
    diners = cards.get("diners", visa)
    longest = longest_test_number()
    strings = {
        "visa": visa,
        "visa-spaces": grouped(visa, " "),
        "visa-dashes": grouped(visa, "-"),
        "visa-padded": f"  {visa} ",
        "visa-broken": broken(visa),
        "mastercard": mc,
        "amex-groups": grouped(amex, " ", (4, 6, 5)),
        "diners": diners,
        "published-19": grouped(longest, "-"),
        "double-space": grouped(visa, "  "),
        "tab": grouped(visa, "\t"),
        "leading-zero": "0" + visa[1:],
        "too-short": visa[:12],
        "too-long": visa + "42424",
        "log-line": f"charge ok card={visa} amount=1999 at 12:30:45 order 6735",
        "log-json": json.dumps({"card": {"number": grouped(mc, " ")}, "last4": mc[-4:]}),
        "glued": f"1 {visa} 2",
        "long-run": visa + broken(mc) + amex,
        "two-cards": f"{visa}/{mc}",
        "arabic-digits": visa.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")),
        "fullwidth-digits": visa.translate(str.maketrans("0123456789", "０１２３４５６７８９")),
        "empty": "",
        "spaces": "   ",
    }
    for name, text in strings.items():
        yield f"str-{name}", b"s" + text.encode("utf-8")
    yield "latin1-nbsp", b"l" + grouped(visa, "\xa0").encode("latin-1")
    yield "int-visa", b"i" + visa.encode()
    yield "int-amex", b"i" + amex.encode()
    yield "int-negative", b"i-" + visa.encode()
    yield "int-bytes", b"i\x00\x0fB@"


def allowlist_seeds() -> Iterator[tuple[str, bytes]]:
    urls = {
        "local": "https://localhost:8445/v1/authorizations",
        "local-upper": "HTTPS://LocalHost:8445/v1/authorizations",
        "acquirer": "https://acquirer.example.com/v1/charges",
        "acquirer-443": "https://acquirer.example.com:443/v1/charges",
        "tokens": "https://pay-1.eu.example.net:8443/api/v2/tokens/",
        "tokens-no-slash": "https://pay-1.eu.example.net:8443/api/v2/tokens",
        "odd-path": "https://a.b.example.org/x;y=1/a:b/~c!$&'()*+,=/end-._",
    }
    for name, url in urls.items():
        yield f"url-{name}", url.encode()
    hostile = json.loads((ROOT / "tests" / "data" / "hostile_urls.json").read_text())["hostile"]
    for index, entry in enumerate(hostile[::8]):
        yield f"hostile-{index:02d}", entry["url"].encode("utf-8")


def audit_seeds() -> Iterator[tuple[str, bytes]]:
    seed = bytes(range(32))  # a fixed key, so that the lines are the same on every run
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    start = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    ticks = iter(range(1000))

    def clock() -> dt.datetime:
        return start + dt.timedelta(milliseconds=137 * next(ticks))

    entries = [
        ("vault.payment_method.create", "key_live_1a2b3c", {"livemode": False, "brand": "visa"}),
        ("keyservice.datakey.unwrap", "spiffe://cardvault/vault", {"kek_version": 3}),
        ("vault.forwarding.create", "key_live_1a2b3c", {"destination": "local-acquirer"}),
        ("vault.payment_method.delete", "key_live_1a2b3c", {}),
        ("vault.auth.denied", "anonymous", {"reason": "api_key_invalid", "note": "café 😀"}),
        ("keyservice.kek.rotate", "spiffe://cardvault/admin", {"kek_version": 4, "n": -1}),
        ("vault.payment_method.create", "key_test_9z8y7x", {"livemode": True, "x": None}),
    ]

    async def write(directory: Path) -> None:
        log = await AuditLog.open(directory, checkpoint_every=3, clock=clock)
        for i, (action, actor, detail) in enumerate(entries):
            await log.append(
                action,
                actor=actor,
                origin="127.0.0.1" if i % 2 else None,
                object_id=f"pm_{i:08d}abcd" if i % 3 else None,
                result="ok" if i % 4 else "denied",
                request_id=f"req_{i:08d}wxyz",
                detail=detail,
            )
        await log.close()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "audit.key").write_bytes(pem)
        (directory / "audit.key").chmod(0o600)
        asyncio.run(write(directory))
        lines = (directory / "audit.jsonl").read_bytes().splitlines(keepends=True)
    for index, line in enumerate(lines):
        yield f"line-{index:02d}", b"l" + line
        if index % 3 == 0:
            yield f"reseal-{index:02d}", b"r" + line
    yield "line-no-newline", b"l" + lines[0].rstrip(b"\n")
    # A tampered line nested 900 deep (see params' json-deep).
    start, end = lines[0].index(b'"detail":'), lines[0].index(b',"prev":')
    deep = lines[0][:start] + b'"detail":' + b"[" * NEST + b"]" * NEST + lines[0][end:]
    yield "line-deep", b"l" + deep
    yield "not-json", b"l{seq:1}\n"


# --- dictionaries ----------------------------------------------------------------------

# fmt: off
DICTIONARIES = {
    "params": [
        "card[number]", "card[exp_month]", "card[exp_year]", "card[cvc]", "type=card",
        "metadata[", "expand[]", "[]", "[0]", "[1]", "][", "=", "&", "+", "%5B", "%5D",
        "%00", "%FF", "%C2%B2", "%E2%82", "%ED%A0%80", "\\ud800", "\\udc00", "\\u0000", "{",
        "}", "[", "]", '":', '","', ",", "null", "true", "1e999", "-0", "NaN", "Infinity",
        "[[[[", "{\"a\":", "\xef\xbb\xbf",
    ],
    "cards": [
        " ", "-", "  ", "--", "4242", "0000", "\t", "\xc2\xa0", "\xd9\xa4", "\xef\xbc\x94",
        "[REDACTED CARD NUMBER]",
    ],
    "allowlist": [
        "https://", "HTTPS://", "localhost", ":8445", ":443", ":0", ":65536", "/v1/authorizations",
        "acquirer.example.com", "pay-1.eu.example.net", ":8443", "/api/v2/tokens/",
        "a.b.example.org", "/x;y=1", "@", "%", "\\", "/../", "/./", "//", "?", "#", "xn--",
        "0x", "127.0.0.1", "[::1]", ".", "\t", "\xef\xbc\x8e",
    ],
    "audit": [
        '"seq":', '"time":', '"actor":', '"origin":', '"action":', '"object":', '"result":',
        '"request_id":', '"detail":{', '"prev":', '"hash":', "null", "true", "false",
        "\\u0000", "\\ud800", "audit.checkpoint", "[[[[[[[[", "]]]]]]]]", "0000000000000000", "[", "{", "}", "]",
        "2026-01-02T03:04:05.678901Z",
    ],
}
# fmt: on


def dict_line(token: str) -> str:
    raw = token.encode("latin-1") if all(ord(c) < 256 for c in token) else token.encode()
    escaped = "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in raw
    )
    return f'"{escaped}"'


def main() -> None:
    cards = test_numbers()
    harnesses = {
        "params": params_seeds(cards),
        "cards": cards_seeds(cards),
        "allowlist": allowlist_seeds(),
        "audit": audit_seeds(),
    }
    for name, seeds in harnesses.items():
        directory = CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        count = 0
        for seed_name, data in seeds:
            (directory / seed_name).write_bytes(data)
            count += 1
        print(f"{directory.relative_to(ROOT)}: {count} seeds")
    DICTS.mkdir(exist_ok=True)
    for name, tokens in DICTIONARIES.items():
        path = DICTS / f"{name}.dict"
        path.write_text(
            f"# libFuzzer dictionary for fuzz_{name}.py (written by make_corpus.py)\n"
            + "".join(dict_line(t) + "\n" for t in tokens)
        )
        print(f"{path.relative_to(ROOT)}: {len(tokens)} tokens")


if __name__ == "__main__":
    main()
