"""The export pipeline (cardvault.vault.exports.service): cards opened a page at a
time, piped through gpg; a whole message when every card went in, and one that fails
at the recipient (and ``export.failed`` audited) when the cards stop midway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cardvault import crypto, pgp
from cardvault.errors import ExportRefused
from cardvault.storage.base import PaymentMethodRecord
from cardvault.vault.exports import service
from cardvault.vault.exports.approval import Approvals, split
from cardvault.vault.exports.recipients import Recipient, Recipients
from cardvault.vault.payment_methods import card_context

NUMBERS = ["4242424242424242", "5555555555554444", "4000056655665556"]


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def record(self, action: str, **kwargs: Any) -> None:
        self.records.append((action, dict(kwargs.get("detail") or {})))


class Keys:
    def __init__(self, key: crypto.Key) -> None:
        self.key = key

    async def for_decryption(self, data_key_id: str, kek: str) -> crypto.Key:
        return self.key


class Store:
    def __init__(self, records: list[PaymentMethodRecord], fail_on_call: int | None) -> None:
        self.records = records
        self.fail_on_call = fail_on_call
        self.calls = 0

    async def get_account(self, account_id: str) -> object:
        return object()

    async def list_payment_methods(
        self, account_id: str, livemode: bool, *, limit: int, starting_after: str | None = None
    ) -> list[PaymentMethodRecord]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("the store went away")
        ids = [r.id for r in self.records]
        start = 0 if starting_after is None else ids.index(starting_after) + 1
        return self.records[start : start + limit]


@pytest.fixture(scope="module")
def recipient_key() -> pgp.NewKey:
    # The pipeline does not check key sizes (the allowlist did, at load): small is quick.
    return pgp.new_key("recipient", key_length=2048)


def records(key: crypto.Key, count: int) -> list[PaymentMethodRecord]:
    out = []
    for i in range(count):
        pm = f"pm_{i:04d}"
        number = NUMBERS[i % len(NUMBERS)]
        out.append(PaymentMethodRecord(
            pm, "acct_1", False, 1, "dk_1",
            crypto.seal(key, number.encode(), card_context("acct_1", "test", pm, "number")),
            "visa", number[-4:], 12, 2034, "credit", f"fp{i}",
            name_ct=crypto.seal(key, b"Holder", card_context("acct_1", "test", pm, "name")),
        ))  # fmt: skip
    return out


def exports(recipient_key: pgp.NewKey, fail_on_call: int | None) -> tuple[Any, Audit, list[str]]:
    key = crypto.Key.generate("dk", 1)
    check, shares = split(2, 2)
    approvals = Approvals(check)
    for share in shares:
        approvals.submit(("acct_1", "test", "acme"), share.to_text())
    acme = Recipient("acme", recipient_key.fingerprint, recipient_key.public_key)
    audit = Audit()
    made = service.Exports(
        Store(records(key, 7), fail_on_call),  # type: ignore[arg-type]
        Keys(key),  # type: ignore[arg-type]
        audit,  # type: ignore[arg-type]
        Recipients({"acme": acme}),
        approvals,
    )
    return made, audit, [s.to_text() for s in shares]


async def collect(made: Any) -> tuple[bytes, BaseException | None]:
    request = {"account": "acct_1", "mode": "test", "recipient": "acme"}
    stream = await made.export("admin", request)
    got = bytearray()
    try:
        async for chunk in stream:
            got += chunk
    except Exception as exc:
        return bytes(got), exc
    return bytes(got), None


def decrypt(key: pgp.NewKey, data: bytes, tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "export.gpg"
    path.write_bytes(data)
    plain = bytearray()
    pgp.decrypt(key.secret_key, key.passphrase, path, lambda c: plain.extend(c) or True)
    return [json.loads(line) for line in plain.decode().splitlines()]


def test_export_streams_every_card_in_one_message(
    recipient_key: pgp.NewKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_PAGE", 3)
    made, audit, _ = exports(recipient_key, None)
    data, error = asyncio.run(collect(made))
    assert error is None
    cards = decrypt(recipient_key, data, tmp_path)
    assert [c["card"]["number"] for c in cards] == [NUMBERS[i % 3] for i in range(7)]
    assert cards[0]["billing_details"]["name"] == "Holder"
    actions = [a for a, _ in audit.records]
    assert actions == ["export.started", "export.completed"]
    assert audit.records[-1][1]["cards"] == 7
    # The approval was used up.
    with pytest.raises(ExportRefused):
        asyncio.run(collect(made))


def test_export_cut_off_midway_is_no_message_and_is_audited(
    recipient_key: pgp.NewKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_PAGE", 3)
    made, audit, _ = exports(recipient_key, fail_on_call=2)
    data, error = asyncio.run(collect(made))
    assert isinstance(error, RuntimeError)
    with pytest.raises(pgp.PgpError):
        decrypt(recipient_key, data, tmp_path)
    actions = [a for a, _ in audit.records]
    assert actions == ["export.started", "export.failed"]
