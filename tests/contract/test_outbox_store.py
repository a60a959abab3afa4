"""The VaultStore contract for events, webhook endpoints and deliveries (the outbox), on
SQLite and PostgreSQL, with the fixtures of ``test_vault_store``."""

from __future__ import annotations

import dataclasses

import pytest

from cardvault.storage import DuplicateError, VaultStore
from cardvault.storage.base import (
    COMPLETED,
    PENDING,
    DeliveryRecord,
    EventRecord,
    WebhookEndpointRecord,
)
from contract.test_vault_store import ACCT, DK, NOW, OTHER, Backend, fwd, pm, seed
from contract.test_vault_store import backend as backend  # the fixture, on both backends
from contract.test_vault_store import vault_postgres_dsn as vault_postgres_dsn


def event(
    event_id: str,
    *,
    type: str = "payment_method.created",
    account_id: str = ACCT,
    livemode: bool = False,
    created: int = NOW,
) -> EventRecord:
    return EventRecord(
        id=event_id,
        account_id=account_id,
        livemode=livemode,
        created=created,
        type=type,
        object_id="pm_1",
        data_key_id=DK,
        data_ct=b"\x01sealed",
    )


def endpoint(
    endpoint_id: str, *, account_id: str = ACCT, **changes: object
) -> WebhookEndpointRecord:
    record = WebhookEndpointRecord(
        id=endpoint_id,
        account_id=account_id,
        livemode=False,
        created=NOW,
        url="https://hooks.example.com/in",
        enabled_events=["payment_method.created"],
        data_key_id=DK,
        secret_ct=b"\x02sealed",
        description="orders",
        metadata={"team": "shop"},
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def delivery(
    delivery_id: str, *, event_id: str = "evt_1", next_attempt: int = 1000
) -> DeliveryRecord:
    return DeliveryRecord(
        id=delivery_id,
        account_id=ACCT,
        livemode=False,
        endpoint_id="we_1",
        event_id=event_id,
        created=NOW,
        next_attempt=next_attempt,
    )


def test_a_payment_method_and_its_event_are_written_together(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_1"), event=event("evt_1"))
        assert await store.get_event(ACCT, False, "evt_1") == event("evt_1")
        # The same id again: neither the row nor the second event is written.
        with pytest.raises(DuplicateError):
            await store.insert_payment_method(pm("pm_1"), event=event("evt_2"))
        assert await store.get_event(ACCT, False, "evt_2") is None

    backend.run(check)


def test_payment_methods_inserted_together_each_keep_their_event(backend: Backend) -> None:
    import asyncio

    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_taken"))
        results = await asyncio.gather(
            *(
                store.insert_payment_method(pm(f"pm_{i}"), event=event(f"evt_{i}"))
                for i in range(5)
            ),
            store.insert_payment_method(pm("pm_taken"), event=event("evt_dup")),
            return_exceptions=True,
        )
        assert [r is None for r in results] == [True] * 5 + [False]
        assert isinstance(results[-1], DuplicateError)
        for i in range(5):
            assert await store.get_event(ACCT, False, f"evt_{i}") is not None
        assert await store.get_event(ACCT, False, "evt_dup") is None

    backend.run(check)


def test_a_delete_writes_its_event_only_when_something_was_deleted(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_1"))
        deleted = event("evt_del", type="payment_method.deleted")
        assert await store.delete_payment_method(ACCT, False, "pm_1", event=deleted) is True
        assert await store.get_event(ACCT, False, "evt_del") == deleted
        again = event("evt_again", type="payment_method.deleted")
        assert await store.delete_payment_method(ACCT, False, "pm_1", event=again) is False
        assert await store.get_event(ACCT, False, "evt_again") is None

    backend.run(check)


def test_a_forward_completed_writes_its_event_once(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_forwarding_request(dataclasses.replace(fwd("fwdreq_1"), outcome=PENDING))
        done = event("evt_fwd", type="forwarding.request.created")
        assert await store.complete_forwarding_request(
            ACCT, False, "fwdreq_1", COMPLETED, {"destination_duration": 1}, {}, event=done
        )
        assert await store.get_event(ACCT, False, "evt_fwd") == done
        late = event("evt_late", type="forwarding.request.failed")
        assert not await store.complete_forwarding_request(
            ACCT, False, "fwdreq_1", COMPLETED, event=late
        )
        assert await store.get_event(ACCT, False, "evt_late") is None

    backend.run(check)


def test_events_list_newest_first_by_type_and_prefix_within_account_and_mode(
    backend: Backend,
) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        for i, kind in enumerate(
            ["payment_method.created", "payment_method.deleted", "forwarding.request.created"]
        ):
            await store.insert_payment_method(
                pm(f"pm_{i}"), event=event(f"evt_{i}", type=kind, created=NOW + i)
            )
        await store.insert_payment_method(
            pm("pm_other", account_id=OTHER), event=event("evt_other", account_id=OTHER)
        )
        await store.insert_payment_method(
            pm("pm_live", livemode=True), event=event("evt_live", livemode=True)
        )

        async def ids(**kw: object) -> list[str]:
            found = await store.list_events(ACCT, False, limit=10, **kw)  # type: ignore[arg-type]
            return [e.id for e in found]

        assert await ids() == ["evt_2", "evt_1", "evt_0"]
        assert await ids(type="payment_method.deleted") == ["evt_1"]
        assert await ids(type="payment_method.*") == ["evt_1", "evt_0"]
        assert await ids(type="payment*") == []
        assert await ids(type="payment_method.*", starting_after="evt_1") == ["evt_0"]
        assert await ids(ending_before="evt_0") == ["evt_2", "evt_1"]
        assert await store.get_event(ACCT, False, "evt_other") is None
        assert await store.get_event(ACCT, True, "evt_live") is not None

    backend.run(check)


def test_dispatch_makes_deliveries_and_claims_lease_them(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.create_webhook_endpoint(endpoint("we_1"))
        with pytest.raises(DuplicateError):
            await store.create_webhook_endpoint(endpoint("we_1"))
        assert await store.webhook_endpoints_for(ACCT, False) == [endpoint("we_1")]
        assert await store.get_webhook_endpoint(OTHER, False, "we_1") is None
        await store.insert_payment_method(pm("pm_1"), event=event("evt_1"))
        assert [e.id for e in await store.undispatched_events(limit=10)] == ["evt_1"]
        await store.dispatch_events(["evt_1"], [delivery("whdel_1")])
        assert await store.undispatched_events(limit=10) == []

        assert await store.claim_deliveries(999, 5000, limit=10) == []
        claimed = await store.claim_deliveries(1000, 5000, limit=10)
        assert [d.id for d in claimed] == ["whdel_1"]
        # Leased: not due again until the lease ends.
        assert await store.claim_deliveries(4999, 9000, limit=10) == []
        failed = dataclasses.replace(
            claimed[0], attempts=1, next_attempt=6000, last_status=500, last_error="http_status"
        )
        assert await store.record_delivery_attempt(failed)
        assert [d.attempts for d in await store.claim_deliveries(6000, 9000, limit=10)] == [1]
        dead = dataclasses.replace(failed, state="dead", attempts=2, next_attempt=None)
        assert await store.record_delivery_attempt(dead)
        assert not await store.record_delivery_attempt(dead)  # no longer pending
        listed = await store.list_deliveries(ACCT, False, "we_1", limit=10)
        assert [(d.state, d.attempts, d.last_status) for d in listed] == [("dead", 2, 500)]
        assert await store.list_deliveries(OTHER, False, "we_1", limit=10) == []

        assert await store.delete_webhook_endpoint(ACCT, False, "we_1")
        assert not await store.delete_webhook_endpoint(ACCT, False, "we_1")
        assert await store.list_deliveries(ACCT, False, "we_1", limit=10) == []

    backend.run(check)


def test_purge_events_removes_old_events_and_their_deliveries(backend: Backend) -> None:
    async def check(store: VaultStore) -> None:
        await seed(store)
        await store.insert_payment_method(pm("pm_old"), event=event("evt_old", created=NOW - 10))
        await store.insert_payment_method(pm("pm_new"), event=event("evt_new"))
        await store.dispatch_events(
            ["evt_old"], [dataclasses.replace(delivery("whdel_old"), created=NOW - 10)]
        )
        assert await store.purge_events(NOW) == 1
        assert await store.get_event(ACCT, False, "evt_old") is None
        assert await store.get_event(ACCT, False, "evt_new") is not None
        assert await store.claim_deliveries(10**15, 10**15, limit=10) == []

    backend.run(check)


def test_system_events_and_their_data_key_are_written_together(backend: Backend) -> None:
    from contract.test_vault_store import data_key

    async def check(store: VaultStore) -> None:
        await seed(store)
        assert await store.account_ids(limit=10) == [ACCT, OTHER]
        assert await store.account_ids(after=ACCT, limit=10) == [OTHER]
        assert await store.account_ids(limit=1) == [ACCT]
        rotated = [
            event("evt_r1", type="key.rotated"),
            event("evt_r2", type="key.rotated", account_id=OTHER, livemode=True),
        ]
        await store.insert_events(rotated, data_key=data_key("dk_pan_2"))
        assert await store.get_data_key("dk_pan_2") is not None
        assert await store.get_event(OTHER, True, "evt_r2") == rotated[1]
        # A duplicate: neither the data key nor any event of the call is written.
        with pytest.raises(DuplicateError):
            await store.insert_events(
                [event("evt_r3", type="key.rotated"), event("evt_r1")],
                data_key=data_key("dk_pan_3"),
            )
        assert await store.get_data_key("dk_pan_3") is None
        assert await store.get_event(ACCT, False, "evt_r3") is None
        # Events alone (the audit log failed: no data key with them).
        await store.insert_events([event("evt_a1", type="audit.failed_closed")])
        assert [e.id for e in await store.undispatched_events(limit=10)] == [
            "evt_a1",
            "evt_r1",
            "evt_r2",
        ]

    backend.run(check)
