"""Exactly-once creates and forwards whatever becomes of the first attempt (issue 19).

Each "process" here is what a vault process holds in memory: its data keys and its
:class:`Idempotency` (its boot id, the claims it is running), over the same SQLite
store and the same audit log, and the real ASGI app in front. A process "dies" by being
left where it stopped (its task suspended forever, so none of its cleanup runs) while a
new process takes its place; the store's state is then exactly what a ``kill -9`` at that
instruction leaves. A store wrapper stands in for a PostgreSQL connection lost after its
commit (the write is done, then the call raises).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cardvault.audit import AuditLog
from cardvault.audit.recorder import Recorder
from cardvault.errors import KeyServiceUnavailable
from cardvault.storage import SQLiteVaultStore
from cardvault.storage.base import PENDING, UNKNOWN, VaultStore
from cardvault.transport.asgi import build_app
from cardvault.vault.accounts import Accounts
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.forwarding.forwarder import Forwarder
from cardvault.vault.forwarding.loader import load_allowlist
from cardvault.vault.forwarding.outbound import (
    DestinationError,
    DestinationUnreachable,
    OutboundResponse,
)
from cardvault.vault.http import PublicAPI, routes
from cardvault.vault.idempotency import Idempotency
from cardvault.vault.payment_methods import PaymentMethods
from cardvault.vault.ratelimit import KeyLimits, RateLimiter

from .test_datakeys import FakeKeyService
from .test_idempotency import FORM

CVC_FORM = {**FORM, "card[cvc]": "314"}
DESTINATION = "https://acquirer.test/v1/authorizations"


# -- the harness -------------------------------------------------------------------------------


class GatedKeyService(FakeKeyService):
    """The fake key service; ``gate`` (when set) holds every data-key call, ``down``
    makes unwrapping fail as an unreachable key service does."""

    def __init__(self, kek: Any = None) -> None:
        super().__init__()
        if kek is not None:
            self.kek = kek
        self.gate: asyncio.Event | None = None
        self.down = False

    async def datakey(self, kek: str) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        return await super().datakey(kek)

    async def unwrap(self, kek: str, wrapped: bytes) -> bytearray:
        if self.down:
            raise KeyServiceUnavailable()
        return await super().unwrap(kek, wrapped)


class Outbound:
    """The outbound HTTPS client, scripted: ``error`` to raise, ``gate`` to hold the
    request (as a destination that never answers), and every request counted."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None

    async def send(self, **request: Any) -> OutboundResponse:
        if self.error is not None:
            if isinstance(self.error, DestinationUnreachable):
                raise self.error  # nothing was written
            self.sent.append(request["body"])
            raise self.error
        self.sent.append(request["body"])
        if self.gate is not None:
            await self.gate.wait()
        return OutboundResponse(200, [("content-type", "application/json")], b'{"ok":1}', None, 3)

    async def close(self) -> None:
        return None


class Wrapped:
    """A store that does what the real one does, with faults added per method: ``after``
    runs once the real call has committed (raise there: a lost acknowledgement),
    ``before`` runs first (raise there: nothing written; or wait there: a process stopped
    at that instruction)."""

    def __init__(self, store: VaultStore) -> None:
        self._store = store
        self.before: dict[str, Callable[[], Awaitable[None]]] = {}
        self.after: dict[str, Callable[[], Awaitable[None]]] = {}

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if not callable(real):
            return real

        async def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.before:
                await self.before[name]()
            result = await real(*args, **kwargs)
            if name in self.after:
                await self.after[name]()
            return result

        return call


def once(exc: BaseException) -> Callable[[], Awaitable[None]]:
    """A fault that raises ``exc`` the first time only."""
    fired: list[bool] = []

    async def fault() -> None:
        if not fired:
            fired.append(True)
            raise exc

    return fault


def forever() -> Callable[[], Awaitable[None]]:
    """A process stopped at this instruction: it never goes on."""

    async def fault() -> None:
        await asyncio.Event().wait()

    return fault


@dataclass
class Process:
    store: Any
    client: httpx.AsyncClient
    idempotency: Idempotency
    keys: GatedKeyService
    outbound: Outbound

    async def create(self, secret: str, key: str | None = None, **form: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {secret}"}
        if key is not None:
            headers["idempotency-key"] = key
        return await self.client.post("/v1/payment_methods", data={**FORM, **form}, headers=headers)

    async def forward(
        self, secret: str, pm_id: str, key: str | None = None, *, cvc: bool = True, **extra: str
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {secret}"}
        if key is not None:
            headers["idempotency-key"] = key
        data = {
            "payment_method": pm_id,
            "url": DESTINATION,
            "replacements[0]": "card_number",
            "request[body]": '{"card": {}}',
            **extra,
        }
        if cvc:
            data["replacements[1]"] = "card_cvc"
        return await self.client.post("/v1/forwarding/requests", data=data, headers=headers)


class World:
    """One store, one audit log, one account; processes made and left to die at will."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.store = SQLiteVaultStore(tmp_path / "v.db")
        self.log: AuditLog | None = None
        self.audit = Recorder(None)
        self.kek: Any = None
        self.secret = ""
        self.clients: list[httpx.AsyncClient] = []
        self.dead: list[asyncio.Future[Any]] = []
        self.allowlist = tmp_path / "allowlist.toml"
        self.allowlist.write_text(
            f'[[destination]]\nname = "acquirer"\nurl = "{DESTINATION}"\nmethods = ["POST"]\n'
            'replacements = ["card_number", "card_expiry", "card_cvc"]\naccounts = ["*"]\n'
            "[destination.placements]\n"
            'card_number = { json = "/card/number" }\ncard_cvc = { json = "/card/cvc" }\n'
            'card_expiry = { json_month = "/card/m", json_year = "/card/y" }\n'
        )

    async def start(self) -> None:
        await self.store.migrate()
        self.log = await AuditLog.open(self.tmp_path / "audit")
        self.audit.log = self.log
        accounts = Accounts(self.store, audit=Recorder(None))
        account = await accounts.create_account("t")
        _, self.secret = await accounts.create_api_key(account.id, "secret", "test")

    def process(
        self, store: Any = None, *, lease: int = 300, clock: Callable[[], float] | None = None
    ) -> Process:
        store = store or self.store
        ks = GatedKeyService(self.kek)
        self.kek = ks.kek  # every process sees the same keys, as the key service's
        keys = DataKeyManager(store, ks)  # type: ignore[arg-type]
        idempotency = Idempotency(
            store, keys, lease=lease, audit=self.audit, **({"clock": clock} if clock else {})
        )
        accounts = Accounts(store, audit=Recorder(None))
        outbound = Outbound()
        forwarder = Forwarder(
            store,
            keys,
            self.audit,
            load_allowlist(self.allowlist),
            outbound,  # type: ignore[arg-type]
        )
        limits = RateLimiter(1e6, 1e6)
        api = PublicAPI(
            accounts=accounts,
            payment_methods=PaymentMethods(store, keys, audit=self.audit),
            idempotency=idempotency,
            payment_method_limits=KeyLimits(secret=limits, publishable=limits),
            forwarder=forwarder,
        )
        app = build_app(routes(api).with_api_key, service="test", security_txt=None)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://vault.test"
        )
        self.clients.append(client)
        return Process(store, client, idempotency, ks, outbound)

    def abandon(self, request: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``request`` in a process that is about to die: it is left where it stops."""
        task = asyncio.ensure_future(request)
        self.dead.append(task)
        return task

    async def close(self) -> None:
        for task in self.dead:
            task.cancel()
        await asyncio.gather(*self.dead, return_exceptions=True)
        for client in self.clients:
            await client.aclose()
        if self.log is not None:
            await self.log.close()
        await self.store.close()

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.tmp_path / "v.db") as db:
            return db.execute(query, args).fetchall()

    def cards(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT id FROM payment_methods ORDER BY id")]

    def actions(self) -> list[tuple[str, str | None, str]]:
        assert self.log is not None
        lines = (self.tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [(r["action"], r["object"], r["result"]) for r in records]


@asynccontextmanager
async def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    await w.start()
    try:
        yield w
    finally:
        await w.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(main: Callable[[World], Awaitable[None]], tmp_path: Path) -> None:
    async def go() -> None:
        async with world(tmp_path) as w:
            await main(w)

    asyncio.run(go())


# -- item 1: no key stuck after a process died --------------------------------------------------


def test_a_claim_whose_process_died_before_its_effect_is_run_again_once(tmp_path: Path) -> None:
    # Before: the claim was committed before the work and released only in-process, so
    # after a kill every retry got 409 idempotency_key_in_use for 24 hours.
    async def main(w: World) -> None:
        dead = w.process()
        dead.keys.gate = asyncio.Event()  # stopped inside the create, after the claim
        first = w.abandon(dead.create(w.secret, "order-1"))
        await until(lambda: bool(w.sql("SELECT 1 FROM idempotency_keys")))
        await asyncio.sleep(0.05)
        alive = w.process()
        retry = await alive.create(w.secret, "order-1")
        assert retry.status_code == 200, retry.text
        assert "idempotent-replayed" not in retry.headers
        assert w.cards() == [retry.json()["id"]]
        again = await alive.create(w.secret, "order-1")
        assert again.json()["id"] == retry.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        # The dead process coming back to life changes nothing: same id, one card.
        dead.keys.gate.set()
        late = await first
        assert late.status_code == 200
        assert late.json()["id"] == retry.json()["id"]
        assert w.cards() == [retry.json()["id"]]

    run(main, tmp_path)


def test_a_claim_whose_process_died_after_its_effect_replays_it(tmp_path: Path) -> None:
    # The card was stored, then the process died before it completed the claim: the
    # retry must learn that card's id (26 cards after the kills had none to learn).
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        wrapped.before["complete_idempotency_key"] = forever()
        dead = w.process(wrapped)
        w.abandon(dead.create(w.secret, "order-2"))
        await until(lambda: bool(w.cards()))
        stored = w.cards()
        retry = await w.process().create(w.secret, "order-2")
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert [retry.json()["id"]] == stored == w.cards()

    run(main, tmp_path)


def test_a_claim_of_this_process_whose_request_is_over_is_taken_over_at_once(
    tmp_path: Path,
) -> None:
    # A request that did nothing could not release its key (the database was gone for a
    # moment): the same process takes the claim over on the next retry, never 409.
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        wrapped.before["release_idempotency_key"] = once(ConnectionResetError("lost"))
        p = w.process(wrapped)
        first = await p.create(w.secret, "order-3", **{"card[exp_month]": "13"})
        assert first.status_code == 402
        assert len(w.sql("SELECT 1 FROM idempotency_keys")) == 1
        retry = await p.create(w.secret, "order-3")
        assert retry.status_code == 200, retry.text
        assert w.cards() == [retry.json()["id"]]

    run(main, tmp_path)


def test_concurrent_retries_of_a_dead_claim_create_one_card(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        dead = w.process()
        dead.keys.gate = asyncio.Event()
        w.abandon(dead.create(w.secret, "order-4"))
        await until(lambda: bool(w.sql("SELECT 1 FROM idempotency_keys")))
        alive = [w.process(), w.process()]
        answers = await asyncio.gather(
            *(alive[n % 2].create(w.secret, "order-4") for n in range(16))
        )
        assert {r.status_code for r in answers} <= {200, 409}
        ids = {r.json()["id"] for r in answers if r.status_code == 200}
        assert len(ids) == 1
        assert w.cards() == list(ids)

    run(main, tmp_path)


# -- item 2: a write that raised after it committed ----------------------------------------------


def test_an_insert_whose_acknowledgement_was_lost_is_found_not_repeated(tmp_path: Path) -> None:
    # Before: any exception from the store was "not written": the key was released and
    # the client's retry stored a second card (132 duplicates in one outage).
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        p = w.process(wrapped)
        wrapped.after["insert_payment_method"] = once(ConnectionResetError("ack lost"))
        first = await p.create(w.secret, "order-5")
        assert first.status_code == 200, first.text
        assert w.cards() == [first.json()["id"]]
        # Without an Idempotency-Key too: the row is looked for, not written twice.
        wrapped.after["insert_payment_method"] = once(ConnectionResetError("ack lost"))
        second = await p.create(w.secret)
        assert second.status_code == 200, second.text
        assert sorted([first.json()["id"], second.json()["id"]]) == w.cards()

    run(main, tmp_path)


def test_when_the_lookup_fails_too_the_retry_finds_the_card(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        p = w.process(wrapped)
        wrapped.after["insert_payment_method"] = once(ConnectionResetError("ack lost"))
        wrapped.before["get_payment_method"] = once(ConnectionResetError("still down"))
        first = await p.create(w.secret, "order-6")
        assert first.status_code >= 500
        assert len(w.cards()) == 1
        retry = await p.create(w.secret, "order-6")
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert w.cards() == [retry.json()["id"]]

    run(main, tmp_path)


def test_lost_acknowledgements_of_the_claim_and_its_completion(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        p = w.process(wrapped)
        # The claim committed, its answer lost: the request fails, the retry runs it.
        wrapped.after["claim_idempotency_key"] = once(ConnectionResetError("ack lost"))
        first = await p.create(w.secret, "order-7")
        assert first.status_code >= 500
        retry = await p.create(w.secret, "order-7")
        assert retry.status_code == 200, retry.text
        assert w.cards() == [retry.json()["id"]]
        # The completion committed, its answer lost: the card is answered all the same.
        wrapped.after["complete_idempotency_key"] = once(ConnectionResetError("ack lost"))
        done = await p.create(w.secret, "order-8")
        assert done.status_code == 200, done.text
        again = await p.create(w.secret, "order-8")
        assert again.json()["id"] == done.json()["id"]
        assert len(w.cards()) == 2

    run(main, tmp_path)


# -- the 24 hours and other parameters ---------------------------------------------------------


def test_the_24_hour_ttl_still_works(tmp_path: Path) -> None:
    now = [1_800_000_000.0]

    async def main(w: World) -> None:
        p = w.process(clock=lambda: now[0])
        first = await p.create(w.secret, "order-9")
        now[0] += 86_400 - 1
        same = await p.create(w.secret, "order-9")
        assert same.json()["id"] == first.json()["id"]
        now[0] += 2
        fresh = await p.create(w.secret, "order-9")
        assert fresh.status_code == 200
        assert "idempotent-replayed" not in fresh.headers
        assert fresh.json()["id"] != first.json()["id"]
        assert len(w.cards()) == 2

    run(main, tmp_path)


def test_a_dead_claim_with_no_effect_lets_other_parameters_use_the_key(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        dead = w.process()
        dead.keys.gate = asyncio.Event()
        w.abandon(dead.create(w.secret, "order-10"))
        await until(lambda: bool(w.sql("SELECT 1 FROM idempotency_keys")))
        alive = w.process()
        other = await alive.create(w.secret, "order-10", **{"card[exp_year]": "2035"})
        assert other.status_code == 200, other.text
        assert other.json()["card"]["exp_year"] == 2035
        # While the first request's effect exists, other parameters are refused.
        refused = await alive.create(w.secret, "order-10")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "idempotency_key_reused"

    run(main, tmp_path)


# -- item 3: audit before effect ------------------------------------------------------------------


def test_the_created_record_is_durable_before_the_row(tmp_path: Path) -> None:
    # Before: the row was inserted first, and a kill between the two left a card with no
    # audit record (17 after the kills, 145 after the outage).
    seen: list[bool] = []

    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)

        async def record_is_there() -> None:
            text = (tmp_path / "audit" / "audit.jsonl").read_text()
            seen.append('"action":"payment_method.created"' in text)

        wrapped.before["insert_payment_method"] = record_is_there
        r = await w.process(wrapped).create(w.secret, "order-11")
        assert r.status_code == 200

    run(main, tmp_path)
    assert seen == [True]


def test_a_row_that_never_came_is_followed_up_by_the_settler(tmp_path: Path) -> None:
    now = [1_800_000_000.0]

    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        # Killed between the record and the row.
        wrapped.before["insert_payment_method"] = forever()
        dead = w.process(wrapped, clock=lambda: now[0])
        w.abandon(dead.create(w.secret, "order-12"))
        await until(lambda: "payment_method.created" in [a for a, _, _ in w.actions()])
        pm_id = next(o for a, o, _ in w.actions() if a == "payment_method.created")
        settler = w.process(clock=lambda: now[0])
        # The owner is gone but its lease runs: nothing is decided yet.
        assert await settler.idempotency.settle_stale() == 0
        now[0] += 301
        assert await settler.idempotency.settle_stale() == 1
        assert ("payment_method.not_stored", pm_id, "error") in w.actions()
        assert w.sql("SELECT 1 FROM idempotency_keys") == []
        assert w.cards() == []

    run(main, tmp_path)


def test_a_failed_write_without_a_key_is_followed_up_once_the_lease_has_passed(
    tmp_path: Path,
) -> None:
    now = [1_800_000_000.0]

    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        p = w.process(wrapped, clock=lambda: now[0])
        wrapped.before["insert_payment_method"] = once(ConnectionResetError("down"))
        r = await p.create(w.secret)
        assert r.status_code >= 500
        pm_id = next(o for a, o, _ in w.actions() if a == "payment_method.created")
        assert await p.idempotency.settle_stale() == 0
        now[0] += 301
        assert await p.idempotency.settle_stale() == 1
        assert w.actions()[-1] == ("payment_method.not_stored", pm_id, "error")

    run(main, tmp_path)


def test_the_settler_completes_a_dead_claim_whose_card_exists(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        wrapped = Wrapped(w.store)
        wrapped.before["complete_idempotency_key"] = forever()
        w.abandon(w.process(wrapped).create(w.secret, "order-13"))
        await until(lambda: bool(w.cards()))
        settler = w.process()
        assert await settler.idempotency.settle_stale() == 1
        assert w.sql("SELECT state, response_status FROM idempotency_keys") == [("done", 200)]
        retry = await settler.create(w.secret, "order-13")
        assert retry.headers["idempotent-replayed"] == "true"
        assert [retry.json()["id"]] == w.cards()

    run(main, tmp_path)


# -- item 4: forwards ---------------------------------------------------------------------------------


async def new_card(w: World, p: Process) -> str:
    r = await p.create(w.secret, **{"card[cvc]": "314"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def cvc_of(w: World, pm_id: str) -> tuple[Any, ...]:
    return w.sql(
        "SELECT cvc_ct, cvc_data_key_id, cvc_expires FROM payment_methods WHERE id = ?", pm_id
    )[0]


def test_a_forward_with_the_key_service_down_keeps_the_cvc(tmp_path: Path) -> None:
    # Before: the CVC was taken before its data key was unwrapped; the answer was 503
    # "retry later", and the retry could never send the CVC.
    async def main(w: World) -> None:
        pm_id = await new_card(w, w.process())
        before = cvc_of(w, pm_id)
        p = w.process()  # its data keys not yet unwrapped
        p.keys.down = True
        # Without the card number: its key would be unwrapped (and fail) first, and the
        # test would pass whatever became of the CVC.
        expiry_and_cvc = {"replacements[0]": "card_expiry"}
        r = await p.forward(w.secret, pm_id, "fwd-1", **expiry_and_cvc)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "keyservice_unavailable"
        assert cvc_of(w, pm_id) == before
        p.keys.down = False
        ok = await p.forward(w.secret, pm_id, "fwd-1", **expiry_and_cvc)
        assert ok.status_code == 200, ok.text
        assert ok.json()["outcome"] == "completed"
        assert b"314" in p.outbound.sent[0]
        assert cvc_of(w, pm_id) == (None, None, None)

    run(main, tmp_path)


def test_a_destination_that_cannot_have_received_anything_consumes_nothing(
    tmp_path: Path,
) -> None:
    # Before: a refused connection consumed the CVC and the key, against the docs.
    async def main(w: World) -> None:
        p = w.process()
        pm_id = await new_card(w, p)
        before = cvc_of(w, pm_id)
        p.outbound.error = DestinationUnreachable()
        r = await p.forward(w.secret, pm_id, "fwd-2")
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "forwarding_destination_error"
        assert "nothing was sent" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        assert cvc_of(w, pm_id) == before
        assert w.sql("SELECT id FROM forwarding_requests") == []
        assert w.sql("SELECT 1 FROM idempotency_keys WHERE response_status IS NOT NULL") == []
        # The key is not consumed: the same key, even with other parameters, runs.
        p.outbound.error = None
        ok = await p.forward(w.secret, pm_id, "fwd-2", **{"metadata[order]": "7"})
        assert ok.status_code == 200, ok.text
        assert "idempotent-replayed" not in ok.headers
        assert len(p.outbound.sent) == 1
        actions = [a for a, _, _ in w.actions()]
        assert actions.count("forward.requested") == 2
        assert "forward.not_sent" in actions

    run(main, tmp_path)


def test_a_forward_whose_request_cannot_be_recorded_takes_nothing(tmp_path: Path) -> None:
    # Issue 21: forward.requested and the pending row (with the CVC taken) are made
    # durable in one pass of the loop, the record first; the row is written only once
    # the record is durable. A record that fails: nothing stored, nothing taken, nothing
    # sent, and the key may be used again.
    async def main(w: World) -> None:
        p = w.process()
        pm_id = await new_card(w, p)
        before = cvc_of(w, pm_id)
        assert w.log is not None
        file = w.log._file
        real_write = file.write

        def full_disk(data: bytes) -> None:
            raise OSError(28, "No space left on device")

        file.write = full_disk  # type: ignore[method-assign]
        r = await p.forward(w.secret, pm_id, "fwd-audit")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "audit_unavailable"
        assert p.outbound.sent == []
        assert w.sql("SELECT id FROM forwarding_requests") == []
        assert cvc_of(w, pm_id) == before
        file.write = real_write  # type: ignore[method-assign]
        ok = await p.forward(w.secret, pm_id, "fwd-audit")
        assert ok.status_code == 200, ok.text
        assert "idempotent-replayed" not in ok.headers
        assert len(p.outbound.sent) == 1
        assert cvc_of(w, pm_id) == (None, None, None)
        actions = [a for a, _, _ in w.actions()]
        assert actions.count("forward.requested") == 1
        assert "forward.completed" in actions

    run(main, tmp_path)


def test_a_destination_that_may_have_received_it_is_never_sent_again(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        p = w.process()
        pm_id = await new_card(w, p)
        p.outbound.error = DestinationError()
        r = await p.forward(w.secret, pm_id, "fwd-3")
        assert r.status_code == 502
        again = await p.forward(w.secret, pm_id, "fwd-3")
        assert again.status_code == 502
        assert again.headers["idempotent-replayed"] == "true"
        assert len(p.outbound.sent) == 1
        assert w.sql("SELECT outcome FROM forwarding_requests") == [(UNKNOWN,)]
        assert cvc_of(w, pm_id) == (None, None, None)

    run(main, tmp_path)


def test_a_forward_whose_process_died_after_sending_is_reported_unknown(tmp_path: Path) -> None:
    async def main(w: World) -> None:
        dead = w.process()
        pm_id = await new_card(w, dead)
        dead.outbound.gate = asyncio.Event()  # the destination has it; the vault dies
        w.abandon(dead.forward(w.secret, pm_id, "fwd-4"))
        await until(lambda: bool(dead.outbound.sent))
        assert w.sql("SELECT outcome FROM forwarding_requests") == [(PENDING,)]
        alive = w.process()
        retry = await alive.forward(w.secret, pm_id, "fwd-4")
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        body = retry.json()
        assert body["outcome"] == "unknown"
        assert body["response_details"] is None
        assert "424242******4242" in body["request_details"]["body"]
        assert alive.outbound.sent == []
        assert w.sql("SELECT outcome FROM forwarding_requests") == [(UNKNOWN,)]
        assert ("forward.completed", body["id"], "outcome_unknown") in w.actions()

    run(main, tmp_path)


def test_a_pending_forward_without_a_key_is_settled_unknown_after_the_lease(
    tmp_path: Path,
) -> None:
    now = [1_800_000_000.0]

    async def main(w: World) -> None:
        dead = w.process(clock=lambda: now[0])
        pm_id = await new_card(w, dead)
        dead.outbound.gate = asyncio.Event()
        w.abandon(dead.forward(w.secret, pm_id))
        await until(lambda: bool(dead.outbound.sent))
        settler = w.process(clock=lambda: now[0])
        # Created "now" by the real clock: the settler's clock is far ahead of it.
        now[0] = 10**10
        assert await settler.idempotency.settle_stale() == 1
        assert w.sql("SELECT outcome FROM forwarding_requests") == [(UNKNOWN,)]

    run(main, tmp_path)
