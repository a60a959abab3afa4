"""The storage layer's interfaces, their records and errors.

Two stores, each in a database of its own (the vault and the key service never share
one):

* ``VaultStore``, the vault's: ciphertext, wrapped data keys, and the few card facts
  that are not secret (brand, last four, expiry, fingerprint). It never sees a plaintext
  card number, CVC or key.
* ``KeyStore``, the key service's: KEKs sealed under the root key, key settings, seal
  metadata and events. It never sees a plaintext key.

Each has a SQLite implementation (the embedded default, :mod:`cardvault.storage.sqlite`)
and a PostgreSQL one (:mod:`cardvault.storage.postgres`), and one contract suite
(``tests/contract/test_vault_store.py``, ``tests/contract/test_keystore.py``) runs
against both.

Every write method returns only after its data is durable (SQLite WAL with
``synchronous=FULL``; PostgreSQL with synchronous commit). Implementations may batch
concurrent writes into one transaction (group commit) as long as that stays true.
Methods are single operations; compositions live in the services that use them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, Protocol

__all__ = [
    "CLAIMED",
    "COMPLETED",
    "DONE",
    "PENDING",
    "UNKNOWN",
    "Account",
    "ApiKey",
    "CardReseal",
    "DataKeyMove",
    "DataKeyRecord",
    "DeliveryRecord",
    "DuplicateError",
    "EventRecord",
    "ForwardingRequestRecord",
    "IdempotencyRecord",
    "ImportBatch",
    "ImportJob",
    "ImportKeyRecord",
    "ImportLink",
    "ImportRow",
    "KekExists",
    "KeyJob",
    "KeyStore",
    "Mode",
    "PaymentMethodRecord",
    "PreconditionFailed",
    "StoredKek",
    "TakenCvc",
    "UnstorableValue",
    "VaultStore",
    "WebhookEndpointRecord",
]

Mode = Literal["test", "live"]

# -- the states of an idempotency claim (IdempotencyRecord.state) -----------------------------

#: The first request holds the key and may still be running (``owner``, ``boot``,
#: ``token`` and ``lease_until`` say who, and until when).
CLAIMED: Final = "claimed"
#: The first request finished: ``response_status`` and ``response_body`` are its answer.
DONE: Final = "done"
#: A forward whose card may have reached its destination, whose answer is not known: it
#: is never sent again; ``response_body`` is what a retry is answered.
UNKNOWN: Final = "unknown"

# -- the outcome of a forwarding request (ForwardingRequestRecord.outcome) -------------------

#: Stored before the request leaves the vault; the request may be under way.
PENDING: Final = "pending"
#: The destination answered: ``request_context`` and ``response_details`` hold it.
COMPLETED: Final = "completed"
# UNKNOWN (above): the request may have reached the destination, whose answer was lost.


class DuplicateError(Exception):
    """A record with this primary key (or unique value) already exists."""


class PreconditionFailed(Exception):
    """A write given ``after`` (a forward's audit record, say) was not made, because
    ``after`` failed: nothing of the operation was written. The caller awaits ``after``
    for why."""


def precondition_met(after: asyncio.Future[Any]) -> bool:
    """Whether ``after`` (settled) succeeded; raises :class:`PreconditionFailed` when it
    failed or was cancelled, and answers False while it is not settled."""
    if not after.done():
        return False
    if after.cancelled() or after.exception() is not None:
        raise PreconditionFailed()
    return True


class UnstorableValue(ValueError):
    """A value of this record cannot be stored at all: text that is not valid Unicode
    (a lone surrogate), an integer past 64 bits. Nothing of the operation was written,
    and it fails alone: a write that shared a batch with it is not affected."""


@dataclass(frozen=True)
class Account:
    id: str  # acct_…
    name: str
    created: int  # unix seconds
    #: Origins (``https://host[:port]``) whose pages may frame this account's card element.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class ApiKey:
    id: str  # key_…
    account_id: str
    kind: Literal["publishable", "secret"]
    mode: Mode
    #: The first characters of the key (``sk_test_AbCd``), for people to recognise it.
    prefix: str
    #: SHA-256 hex of the whole key. Keys are 32 random bytes, so a fast hash is safe.
    hash: str
    created: int
    revoked: int | None = None


@dataclass(frozen=True)
class DataKeyRecord:
    id: str  # dk_…
    kek: str  # "pan" or "cvc"
    kek_version: int
    wrapped: bytes
    created: int


@dataclass(frozen=True)
class KeyJob:
    """A re-encryption run over one KEK's stored data keys: every key under a version
    below ``target_version`` is moved to it. ``cursor``: the last data key id reached
    (the walk is in id order); ``finished``: when the run ended, None while it runs.

    A run over card data (``kek`` is ``"pan:data"`` or ``"cvc:data"``) re-seals every
    ciphertext under a data key made before ``data_before`` with a fresh data key; its
    cursor is the last payment method id reached and ``target_version`` is 0;
    ``skipped`` counts the cards of the current pass that cannot be opened (their data
    key's version is destroyed, or their stored data fails authentication)."""

    kek: str
    run_id: str
    target_version: int
    cursor: str
    moved: int
    started: int
    updated: int
    finished: int | None = None
    data_before: int | None = None
    skipped: int = 0


#: One payment method's card data sealed anew: ``(payment method id, the data key it was
#: read under, the data key it is now sealed with, the first ciphertext, the second)``:
#: for ``pan`` the number and the name (None when it has none), for ``cvc`` the CVC and
#: None.
CardReseal = tuple[str, str, str, bytes, bytes | None]

#: One data key to move: ``(id, the version it is under, wrapped anew, the new version)``.
DataKeyMove = tuple[str, int, bytes, int]


@dataclass(frozen=True)
class PaymentMethodRecord:
    id: str  # pm_…
    account_id: str
    livemode: bool
    created: int
    data_key_id: str
    number_ct: bytes  # sealed card number
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    funding: str
    fingerprint: str
    name_ct: bytes | None = None  # sealed cardholder name
    metadata: dict[str, str] = field(default_factory=dict)
    #: billing_details without the name (which is sealed): address, email, phone.
    billing_details: dict[str, object] = field(default_factory=dict)
    cvc_ct: bytes | None = None  # sealed CVC, short-lived
    cvc_data_key_id: str | None = None
    cvc_expires: int | None = None  # unix seconds
    cvc_check: str | None = None  # "unchecked" / "pass" / "fail" / None


@dataclass(frozen=True)
class IdempotencyRecord:
    """One Idempotency-Key of an account and mode, and the state of its request:
    :data:`CLAIMED` (running, or stopped before it finished), :data:`DONE` or
    :data:`UNKNOWN` (docs/api.md, "Idempotency")."""

    account_id: str
    mode: Mode
    key: str
    request_hash: str
    #: When the key was first claimed (its 24 hours run from here).
    created: int
    #: None while the first request is still in flight.
    response_status: int | None = None
    response_body: str | None = None
    state: str = CLAIMED
    #: Who holds the claim: the replica (a process's stable name), its boot (a random id
    #: per start of the process) and a token of this hold (a new one at every takeover).
    owner: str | None = None
    boot: str | None = None
    token: str | None = None
    #: Unix seconds after which the claim is stale whoever holds it.
    lease_until: int | None = None
    #: The id of the object the request creates (``pm_…``, ``fwdreq_…``), chosen when the
    #: key is claimed, so that a retry can look for it.
    effect_id: str | None = None


@dataclass(frozen=True)
class ForwardingRequestRecord:
    """A forward, as stored and returned: already redacted (no card number beyond BIN and
    last four, no CVC, no credential the vault added)."""

    id: str  # fwdreq_…
    account_id: str
    livemode: bool
    created: int
    payment_method: str
    url: str
    destination: str  # the allowlist entry's name
    replacements: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    request_context: dict[str, object] = field(default_factory=dict)
    request_details: dict[str, object] = field(default_factory=dict)
    response_details: dict[str, object] = field(default_factory=dict)
    #: :data:`PENDING`, :data:`COMPLETED` or :data:`UNKNOWN`.
    outcome: str = COMPLETED


@dataclass(frozen=True)
class ImportKeyRecord:
    """The vault's OpenPGP import key: ``secret_key`` is gpg's armored export, protected
    by a passphrase; the passphrase is stored only sealed under the data key
    ``data_key_id`` (the vault opens it with keyd's help)."""

    fingerprint: str
    public_key: str
    secret_key: str
    data_key_id: str
    sealed_passphrase: bytes
    created: int


@dataclass(frozen=True)
class ImportJob:
    """The import of one file into one account and mode. ``cursor``: the last row
    number (from 1) committed; ``total_rows``: the file's rows, once checked;
    ``reasons``: invalid rows counted by reason."""

    id: str  # imp_…
    account_id: str
    livemode: bool
    file_sha256: str
    format: str
    total_rows: int
    cursor: int
    imported: int
    duplicates: int
    already: int
    invalid: int
    reasons: dict[str, int]
    started: int
    updated: int
    finished: int | None = None


@dataclass(frozen=True)
class ImportRow:
    """What became of one row of an import job: ``pm_id`` (imported, or imported
    before) or ``reason`` and ``detail`` (refused; no card number in either)."""

    job_id: str
    row_number: int
    line: int
    external_id: str
    pm_id: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class ImportLink:
    """An external id of an account and mode, and the card it names."""

    account_id: str
    livemode: bool
    external_id: str
    pm_id: str
    fingerprint: str
    job_id: str


@dataclass(frozen=True)
class ImportBatch:
    """One batch of an import, written in one transaction: the new payment methods,
    their links, every row's outcome, and the job with its cursor moved past them."""

    payment_methods: Sequence[PaymentMethodRecord]
    links: Sequence[ImportLink]
    rows: Sequence[ImportRow]
    job: ImportJob


@dataclass(frozen=True)
class EventRecord:
    """One event of the outbox (docs/reliability.md, "Events and webhooks"): written in
    the transaction of the change it describes. ``data_ct`` is the event's ``data``
    (the object as the API renders it) sealed under the data key ``data_key_id``.
    ``dispatched``: its deliveries have been made (one per subscribed endpoint)."""

    id: str  # evt_…
    account_id: str
    livemode: bool
    created: int
    type: str
    object_id: str
    data_key_id: str
    data_ct: bytes
    dispatched: bool = False


@dataclass(frozen=True)
class WebhookEndpointRecord:
    """A webhook endpoint: its signing secret only sealed (``secret_ct`` under the data
    key ``data_key_id``)."""

    id: str  # we_…
    account_id: str
    livemode: bool
    created: int
    url: str
    enabled_events: list[str]
    data_key_id: str
    secret_ct: bytes
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryRecord:
    """One event to deliver to one endpoint: ``state`` is ``pending`` (``next_attempt``
    says when, unix milliseconds), ``succeeded`` or ``dead`` (given up: the
    dead-letter state). ``last_error`` is a constant, never the receiver's text."""

    id: str  # whdel_…
    account_id: str
    livemode: bool
    endpoint_id: str
    event_id: str
    created: int
    state: str = "pending"
    attempts: int = 0
    next_attempt: int | None = None
    last_attempt: int | None = None
    last_status: int | None = None
    last_error: str | None = None


class TakenCvc(NamedTuple):
    """A payment method's sealed CVC as :meth:`VaultStore.take_cvc` erased it: what
    :meth:`VaultStore.restore_cvc` puts back."""

    cvc_ct: bytes
    data_key_id: str
    expires: int | None


class VaultStore(Protocol):
    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version. Idempotent; safe to run
        from several replicas at once."""

    # -- accounts and keys -------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        """Raises DuplicateError if the id exists."""

    async def get_account(self, account_id: str) -> Account | None: ...

    async def set_allowed_origins(self, account_id: str, origins: Sequence[str]) -> bool:
        """Replace the origins allowed to frame the account's card element with
        ``origins`` (already normalized by the caller; stored in this order). False if
        there is no such account."""

    async def create_api_key(self, key: ApiKey) -> None:
        """Raises DuplicateError if the id or hash exists."""

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not (the caller checks ``revoked``)."""

    async def list_api_keys(self, account_id: str) -> list[ApiKey]: ...

    async def revoke_api_key(self, key_id: str, when: int) -> bool:
        """Mark a key revoked. False if there is no such key or it was already revoked."""

    # -- data keys ---------------------------------------------------------------------

    async def insert_data_key(self, record: DataKeyRecord) -> None: ...

    async def get_data_key(self, data_key_id: str) -> DataKeyRecord | None: ...

    async def data_key_counts(self) -> dict[str, dict[int, int]]:
        """How many stored data keys each KEK version wraps: ``{kek: {version: n}}``."""

    async def data_keys_below(
        self, kek: str, version: int, after: str, limit: int
    ) -> list[DataKeyRecord]:
        """Up to ``limit`` of ``kek``'s data keys under a version below ``version``
        whose id is after ``after``, in id order."""

    async def move_data_keys(self, moves: Sequence[DataKeyMove]) -> int:
        """Store each data key wrapped anew, one row write each (its wrapped key and
        version together), only where it is still under the version it was read
        under; how many were moved. One transaction."""

    async def cards_sealed_before(
        self, kek: str, before: int, after: str, limit: int
    ) -> list[PaymentMethodRecord]:
        """Up to ``limit`` payment methods, in id order after ``after``, whose ``kek``
        data (``pan``: number and name; ``cvc``: a CVC still held) is sealed under a data
        key made before ``before``."""

    async def count_cards_sealed_before(self, kek: str, before: int) -> int:
        """How many payment methods :meth:`cards_sealed_before` would walk."""

    async def reseal_cards(self, kek: str, reseals: Sequence[CardReseal]) -> int:
        """Store each payment method's ``kek`` data sealed anew, one row write each (the
        data key and the ciphertexts together), only where the row is still under the
        data key it was read under (and, for ``cvc``, still holds its CVC); how many
        were stored. One transaction."""

    async def get_key_job(self, kek: str) -> KeyJob | None:
        """The re-encryption run of ``kek``, running or last finished."""

    async def put_key_job(self, job: KeyJob) -> None:
        """Store (insert or replace) the re-encryption run of ``job.kek``."""

    # -- bulk import -------------------------------------------------------------------

    async def put_import_key(self, record: ImportKeyRecord) -> None:
        """Store a new import key. Raises DuplicateError if its fingerprint exists."""

    async def get_import_key(self) -> ImportKeyRecord | None:
        """The newest import key (by ``created``, then fingerprint), or None."""

    async def get_import_job(self, job_id: str) -> ImportJob | None: ...

    async def put_import_job(self, job: ImportJob) -> None:
        """Store (insert or replace) ``job``."""

    async def import_links(
        self, account_id: str, livemode: bool, external_ids: Sequence[str]
    ) -> list[ImportLink]:
        """The links of those of ``external_ids`` already taken in this account and mode."""

    async def present_fingerprints(
        self, account_id: str, livemode: bool, fingerprints: Sequence[str]
    ) -> set[str]:
        """Those of ``fingerprints`` that a payment method of this account and mode has."""

    async def write_import_batch(self, batch: ImportBatch) -> None:
        """Write the whole batch in one transaction, or nothing of it: DuplicateError
        when a payment method id, an external id (a link) or a row is taken,
        UnstorableValue when a value cannot be stored. Durable when it returns."""

    async def import_rows(self, job_id: str, after: int, limit: int) -> list[ImportRow]:
        """Up to ``limit`` of the job's rows numbered after ``after``, in order."""

    # -- payment methods ---------------------------------------------------------------

    async def insert_payment_method(
        self, record: PaymentMethodRecord, *, event: EventRecord | None = None
    ) -> None:
        """Durable when it returns. Raises DuplicateError if the id exists. ``event``:
        written in the same transaction (both or neither)."""

    async def get_payment_method(
        self, account_id: str, livemode: bool, pm_id: str
    ) -> PaymentMethodRecord | None:
        """Only a record of this account *and* mode: others are invisible (None)."""

    async def list_payment_methods(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[PaymentMethodRecord]:
        """Newest first (created, then id, descending), Stripe's cursor semantics:
        ``starting_after`` gives the page after that object, ``ending_before`` the page
        before it (still newest first). At most ``limit`` records."""

    async def delete_payment_method(
        self, account_id: str, livemode: bool, pm_id: str, *, event: EventRecord | None = None
    ) -> bool:
        """Remove the record and its ciphertext for good. False if not found. ``event``:
        written in the same transaction, only when the record was removed."""

    async def destroy_cvc(self, account_id: str, livemode: bool, pm_id: str) -> bool:
        """Erase the sealed CVC of one payment method. False if none was stored."""

    async def destroy_expired_cvcs(self, now: int) -> int:
        """Erase every sealed CVC whose ``cvc_expires`` <= now; the number erased."""

    async def take_cvc(self, account_id: str, livemode: bool, pm_id: str) -> TakenCvc | None:
        """Atomically read and erase a payment method's sealed CVC (its ciphertext, data
        key id and expiry), or None when there is none (never stored, used, or expired).
        Two concurrent calls never both get it."""

    async def restore_cvc(
        self, account_id: str, livemode: bool, pm_id: str, taken: TakenCvc
    ) -> bool:
        """Put back a CVC exactly as :meth:`take_cvc` took it. False, and nothing
        written, when the payment method is gone or holds a CVC again."""

    # -- forwarding requests -----------------------------------------------------------

    async def insert_forwarding_request(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> None:
        """Durable when it returns. Raises DuplicateError if the id exists.

        ``after`` (a forward's ``forward.requested``, being made durable): the row is
        written only once ``after`` has succeeded, and never when it fails
        (:class:`PreconditionFailed`, nothing written). A store may write it in the
        same flush as ``after`` (SQLite: both flushes run in one pass of the event loop,
        the audit log's first), or after awaiting it."""

    async def take_cvc_for_forward(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> TakenCvc | None:
        """In one transaction: take the CVC of ``record.payment_method`` (as
        :meth:`take_cvc`) and insert ``record`` (a forward about to leave, outcome
        :data:`PENDING`). None, and nothing written, when there is no CVC to take.
        Raises DuplicateError (nothing written) if the id exists. ``after``: as for
        :meth:`insert_forwarding_request`."""

    async def complete_forwarding_request(
        self,
        account_id: str,
        livemode: bool,
        fwd_id: str,
        outcome: str,
        request_context: dict[str, object] | None = None,
        response_details: dict[str, object] | None = None,
        *,
        event: EventRecord | None = None,
    ) -> bool:
        """Set a :data:`PENDING` forward's outcome (:data:`COMPLETED` with what the
        destination answered, or :data:`UNKNOWN`). False if it is not pending (settled
        already) or not there. ``event``: written in the same transaction, only when the
        outcome was set."""

    async def cancel_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str, restore: TakenCvc | None
    ) -> bool:
        """A :data:`PENDING` forward that cannot have reached its destination: in one
        transaction, delete it and put back the CVC it took (``restore``, when given, as
        :meth:`restore_cvc`). False, and nothing written, when it is not pending."""

    async def pending_forwarding_requests(
        self, created_before: int, *, limit: int
    ) -> list[ForwardingRequestRecord]:
        """:data:`PENDING` forwards created before ``created_before``, oldest first, at
        most ``limit``: every account and mode."""

    async def get_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str
    ) -> ForwardingRequestRecord | None: ...

    async def list_forwarding_requests(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[ForwardingRequestRecord]:
        """As :meth:`list_payment_methods`."""

    async def purge_forwarding_requests(self, before: int) -> int:
        """Delete forwarding requests created before ``before``; the number deleted."""

    # -- idempotency -------------------------------------------------------------------

    async def claim_idempotency_key(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        """Insert ``record`` (in flight) if no record exists for (account, mode, key) and
        return None; otherwise return the existing record unchanged. Atomic across
        replicas."""

    async def take_over_idempotency_key(
        self, record: IdempotencyRecord, expected_token: str
    ) -> bool:
        """Compare and set: if the key's record is :data:`CLAIMED` with the token
        ``expected_token``, replace its ``request_hash``, ``owner``, ``boot``, ``token``,
        ``lease_until`` and ``effect_id`` with ``record``'s and return True; otherwise
        change nothing and return False. Of concurrent calls with the same expected
        token, at most one succeeds."""

    async def complete_idempotency_key(
        self,
        account_id: str,
        mode: Mode,
        key: str,
        status: int,
        body: str,
        *,
        token: str | None = None,
        state: str = DONE,
    ) -> bool:
        """Store the response of the first request, and the record's new ``state``
        (:data:`DONE` or :data:`UNKNOWN`). With ``token``, only if the record is still
        :data:`CLAIMED` under that token. False if nothing was changed."""

    async def release_idempotency_key(
        self, account_id: str, mode: Mode, key: str, *, token: str | None = None
    ) -> bool:
        """Forget a claim (its request did nothing): with ``token``, only the record held
        under that token. False if nothing was deleted."""

    async def stale_idempotency_claims(
        self, now: int, owner: str, boot: str, *, limit: int
    ) -> list[IdempotencyRecord]:
        """:data:`CLAIMED` records whose lease has run out (``lease_until`` <= ``now``)
        or that ``owner`` holds under another boot than ``boot``: every account and mode,
        oldest lease first, at most ``limit``."""

    async def purge_idempotency_keys(self, before: int) -> int:
        """Delete records created before ``before``; the number deleted."""

    # -- events and webhooks (the outbox) --------------------------------------------

    async def get_event(self, account_id: str, livemode: bool, event_id: str) -> EventRecord | None:
        """Only an event of this account *and* mode."""

    async def list_events(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
        type: str | None = None,
    ) -> list[EventRecord]:
        """As :meth:`list_payment_methods`; ``type``: only events of that type, or of
        every type under a prefix when it ends with ``.*`` (``payment_method.*``)."""

    async def undispatched_events(self, *, limit: int) -> list[EventRecord]:
        """Events whose deliveries are not made yet, oldest first: every account and
        mode."""

    async def dispatch_events(
        self, event_ids: Sequence[str], deliveries: Sequence[DeliveryRecord]
    ) -> None:
        """In one transaction: insert ``deliveries`` and mark ``event_ids`` dispatched."""

    async def purge_events(self, before: int) -> int:
        """Delete events and deliveries created before ``before``; the events deleted."""

    async def insert_events(
        self, events: Sequence[EventRecord], *, data_key: DataKeyRecord | None = None
    ) -> None:
        """In one transaction: ``data_key`` (when given) and ``events``. For the events
        of a change that is no row of the vault's own (a KEK rotated in the key service,
        the audit log failing), with the data key the vault starts using because of it.
        Raises DuplicateError if an id exists: nothing written."""

    async def account_ids(self, *, after: str = "", limit: int) -> list[str]:
        """Account ids in order, after ``after``, at most ``limit``: the accounts a
        system event (one of no account's doing) is written to."""

    async def create_webhook_endpoint(self, record: WebhookEndpointRecord) -> None:
        """Raises DuplicateError if the id exists."""

    async def get_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> WebhookEndpointRecord | None:
        """Only an endpoint of this account *and* mode."""

    async def list_webhook_endpoints(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[WebhookEndpointRecord]:
        """As :meth:`list_payment_methods`."""

    async def webhook_endpoints_for(
        self, account_id: str, livemode: bool
    ) -> list[WebhookEndpointRecord]:
        """Every endpoint of this account and mode (what an event is delivered to)."""

    async def delete_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> bool:
        """In one transaction: delete the endpoint and its deliveries. False if not
        found."""

    async def claim_deliveries(self, now: int, until: int, *, limit: int) -> list[DeliveryRecord]:
        """Pending deliveries due (``next_attempt`` <= ``now``, unix ms), oldest first, at
        most ``limit``, each moved to ``next_attempt = until`` before it is returned (a
        lease: one attempt at a time, and a crash mid-attempt retries after ``until``)."""

    async def record_delivery_attempt(self, record: DeliveryRecord) -> bool:
        """Store a pending delivery's ``state``, ``attempts``, ``next_attempt``,
        ``last_attempt``, ``last_status`` and ``last_error``. False if it is not pending
        (or not there)."""

    async def list_deliveries(
        self, account_id: str, livemode: bool, endpoint_id: str, *, limit: int
    ) -> list[DeliveryRecord]:
        """The endpoint's deliveries, newest first, at most ``limit``."""

    # -- periodic jobs -----------------------------------------------------------------

    async def lead_jobs(self) -> bool:
        """Whether this store's process is the one that runs the vault's periodic jobs
        now (the CVC sweep, settling and purging idempotency keys, purging forwarding
        requests), asked before each run.

        Of the stores sharing one database, at most one leads at a time. The lead is
        taken when it is free and kept until the store is closed or its process or its
        connection to the database dies; then the next call of another store takes it.
        A call that finds the lead lost (the connection dropped) answers False unless it
        can take it again. PostgreSQL: a session-level advisory lock on a connection of
        its own. SQLite: always True (one vault process per database file)."""

    async def close(self) -> None:
        """Finish what is queued and close the connections (and give up the lead of the
        periodic jobs). Idempotent."""


# -- the key service's store ----------------------------------------------------------------


@dataclass(frozen=True)
class StoredKek:
    """One version of a KEK, sealed under the root key (the store never sees it open)."""

    name: str
    version: int
    sealed: bytes
    created: int


class KekExists(DuplicateError):
    """A KEK with this name and version is already stored."""


class KeyStore(Protocol):
    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version. Idempotent; safe to run
        from several replicas at once."""

    async def get_meta(self, key: str) -> str | None:
        """The metadata value stored under ``key``, or None."""

    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    async def add_kek(self, kek: StoredKek) -> None:
        """Store a sealed KEK version. Raises :class:`KekExists` if it is stored already."""

    async def list_keks(self) -> list[StoredKek]:
        """Every stored KEK version, ordered by name then version."""

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        """Persist a key's ``min_decryption_version``."""

    async def replace_seal(self, keks: Sequence[StoredKek], meta: dict[str, str]) -> None:
        """In one transaction: replace the sealed form of every KEK version in ``keks``
        (a reseal under a new root key) and set the ``meta`` values. Raises ValueError,
        nothing written, when a KEK in ``keks`` is not stored or a stored one is left
        out: a reseal moves every KEK or none."""

    async def delete_kek(self, name: str, version: int) -> bool:
        """Delete one sealed KEK version for good (its destruction): False when it was
        not stored. Durable when it returns."""

    async def min_decryption_versions(self) -> dict[str, int]:
        """Every persisted ``min_decryption_version``, by key name."""

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        """Append one event (unseal attempts, seal, rotation …). Never holds key material."""

    async def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first: ``at`` (unix milliseconds), ``actor``, ``action``,
        ``result``, ``detail``."""

    async def close(self) -> None:
        """Release connections. Idempotent."""
