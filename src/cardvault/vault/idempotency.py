"""Idempotency-Key: a create retried with the same key is done once (Stripe's semantics),
whatever became of the first attempt: answered, refused, or cut off by a crash, a lost
database connection or an error.

Same key and same parameters: the first result (the object read again now, or the
error that may have sent a request out); other parameters: 400; the first request
still running: 409. A request that failed with nothing done stores nothing, so its key
can be used again. Keys are remembered ``ttl`` seconds (24 hours by default).

**A durable state machine per key** (the record in the store, :class:`IdempotencyRecord`):

* ``claimed``: a request holds the key. The record names its holder (``owner``, the
  replica's name; ``boot``, a random id of this start of the process; ``token``, this
  hold), a lease (``lease_until``: now + ``lease`` seconds, well above the longest
  request) and the id of the object the request will create (``effect_id``), chosen
  now, before anything is done.
* ``done``: the answer is stored (the object's id, or the code of an error that may
  have sent a request out). A retry replays it.
* ``unknown``: a forward whose card may have reached its destination and whose answer
  was lost; it is never sent again, and a retry answers the stored forwarding request
  (``outcome: "unknown"``) or the error first answered.

A claimed record is **stale** when its lease has run out, when its owner is this
replica under another boot (the process that held it is gone), or when this very
process holds it but no request of it is running any more. The next request with the
key takes a stale claim over (compare-and-set on the token, so one of concurrent
retries wins) and first looks for the effect by its id: found, the claim is completed
and the first result replayed (a payment method stored although its process died, or
although the database raised after the commit: a lost acknowledgement); not found, the
request runs, under the same id, so that a commit still landing from the first attempt
can only collide with it, never duplicate it. :meth:`Idempotency.settle_stale` (at
start-up and once a minute) completes stale claims whose effect exists, marks forwards
still pending past the lease ``unknown``, and releases claims whose lease ran out with
no effect, after the audit follow-up (``payment_method.not_stored``,
``forward.not_sent``) for a record that may name it.

The service that runs the create gets a :class:`Claim`: the id to create its object
under, and two calls: :meth:`Claim.begin` just before its effect's first durable write
(from then on a failure may have taken effect, so the claim is kept for a retry to look,
never released), and :meth:`Claim.undone` when it knows the effect did not happen after
all (nothing was sent, and what was taken is put back).

Nothing the caller sent is stored as sent. The key is stored as ``ik_`` and a MAC of the
header under the account's own key (:func:`stored_idempotency_key`): the header is the
caller's text and may hold a card number. The parameters are stored as a MAC under the
same key: a plain hash of parameters holding a card number could be brute-forced back
to the number. The stored result is the new object's id, never its content, so no
cardholder data rests in this table.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, NamedTuple

from cardvault import crypto
from cardvault.audit.recorder import Recorder
from cardvault.errors import (
    CardVaultError,
    IdempotencyError,
    IdempotencyKeyInUse,
    InvalidRequestError,
    error_class_for,
)
from cardvault.logging import get_logger
from cardvault.storage import STORED_IDEMPOTENCY_KEY_PREFIX
from cardvault.storage.base import (
    CLAIMED,
    DONE,
    PENDING,
    UNKNOWN,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    VaultStore,
)
from cardvault.vault.accounts import Caller
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.ids import time_ordered_id

__all__ = [
    "DEFAULT_LEASE",
    "Claim",
    "Idempotency",
    "Outcome",
    "stored_idempotency_key",
]

_log = get_logger("cardvault.vault.idempotency")

_MAX_IDEMPOTENCY_KEY = 255
#: Domain separation: the same account key makes card fingerprints (digits only) and
#: parameter MACs (a JSON array), so this prefix can be neither.
_IDEMPOTENCY_KEY_CONTEXT = b"cardvault idempotency-key v1\x00"
#: A stored result that is an error's code, not an object's id, starts with this.
_ERROR_MARK = "!"
#: Seconds a claim is held before it is stale whoever holds it: well above the longest
#: request (a forward: two key-service calls of at most 5 s each, a destination's
#: timeout of at most 60 s, a database connection waited for at most 10 s, and the
#: durable writes), so that a request still running is never taken over.
DEFAULT_LEASE: Final = 300
#: Rounds of claim, look and take over before a request gives up with 409.
_ATTEMPTS = 8
#: Creates without an Idempotency-Key whose outcome was unknown, remembered for the
#: settler at most (beyond that the oldest are forgotten, with a log line).
_MAX_UNSETTLED = 10_000
#: The actor of what the settler records.
_SETTLER = "sweeper"


def stored_idempotency_key(account_key: crypto.Key, header: str) -> str:
    """The Idempotency-Key as it is stored: ``ik_`` and a MAC of the header under the
    account's key. The header is the caller's text, and an outside tester stored a card
    number in the clear through it; keyed, because an unkeyed hash of a card number is
    undone by trying every number."""
    return STORED_IDEMPOTENCY_KEY_PREFIX + crypto.fingerprint(
        account_key, _IDEMPOTENCY_KEY_CONTEXT + header.encode("utf-8")
    )


class Outcome(NamedTuple):
    """A create's answer, and whether it is the first request's, replayed."""

    body: dict[str, Any]
    replayed: bool


class Claim:
    """One create's hold on its Idempotency-Key, handed to the service that runs it.

    ``effect_id`` is the id the service must give the object it creates (chosen when the
    key was claimed, so that a retry can look for it). A create without an
    Idempotency-Key gets a claim too (``record`` None), so that services need not tell
    the two apart.
    """

    __slots__ = ("begun", "effect_id", "inherited", "is_undone", "record")

    def __init__(
        self, effect_id: str, record: IdempotencyRecord | None = None, *, inherited: bool = False
    ) -> None:
        self.effect_id = effect_id
        self.record = record
        #: Taken over from an earlier attempt that stopped before it finished.
        self.inherited = inherited
        self.begun = False
        self.is_undone = False

    def begin(self) -> None:
        """The effect's first durable write is about to be made: from here on a failure
        may have taken effect (a commit whose acknowledgement was lost), so the claim is
        kept for a retry to look, never released."""
        self.begun = True

    def undone(self) -> None:
        """The effect certainly did not happen (nothing was sent, and what was taken is
        back): the key may be used again."""
        self.is_undone = True

    @property
    def may_have_taken_effect(self) -> bool:
        return self.begun and not self.is_undone


Create = Callable[[Claim], Awaitable[dict[str, Any]]]
Replay = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class _Unsettled:
    """A create without an Idempotency-Key whose effect may or may not have happened."""

    account_id: str
    livemode: bool
    effect_id: str
    since: int


class Idempotency:
    """The vault's Idempotency-Key records, in its store, keyed by each account's key.

    Needs the store, the data keys (for the account's key) and the audit recorder (for
    the follow-up records of attempts that never finished). ``lease``: seconds a claim
    is held (:data:`DEFAULT_LEASE`); ``replica``: this process's stable name among the
    vaults that share the database (the host name by default: two vaults on one host
    sharing a database need names of their own). The HTTP layer calls :meth:`run` once
    per create; the vault calls :meth:`settle_stale` at start-up and once a minute.
    """

    def __init__(
        self,
        store: VaultStore,
        keys: DataKeyManager,
        *,
        ttl: int = 86_400,
        lease: int = DEFAULT_LEASE,
        audit: Recorder | None = None,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease < 1:
            raise ValueError("lease must be at least 1 second")
        self.store = store
        self.keys = keys
        self.ttl = ttl
        self.lease = lease
        self.audit = audit or Recorder(None)
        self.replica = replica or socket.gethostname() or "vault"
        #: This start of the process: a claim of this replica under another boot was
        #: held by a process that is gone.
        self.boot = secrets.token_hex(8)
        self.clock = clock
        #: Tokens of the claims a request of this process is running now.
        self._active: set[str] = set()
        self._unsettled: dict[str, _Unsettled] = {}

    # -- a create ----------------------------------------------------------------------

    async def run(
        self,
        caller: Caller,
        header: str | None,
        path: str,
        params: dict[str, Any],
        create: Create,
        replay: Replay,
        *,
        prefix: str = "pm_",
    ) -> Outcome:
        """``create(claim)`` at most once per ``header`` (the request's Idempotency-Key,
        or None) for ``path`` and ``params``; ``replay(object_id)`` reads the first
        result again. ``prefix`` is that of the ids the create makes (``pm_``,
        ``fwdreq_``).

        An error whose ``consumes_idempotency_key`` is true (a forward that reached the
        network) is remembered too, so a retry with the same key repeats the error
        instead of sending a second outbound request."""
        if header is None:
            return Outcome(await self._run_unkeyed(caller, create, prefix), replayed=False)
        if not header or len(header) > _MAX_IDEMPOTENCY_KEY:
            raise InvalidRequestError("Idempotency-Key must be 1 to 255 characters.")
        account_key = await self.keys.account_key(caller.account_id)
        canonical = json.dumps([path, params], sort_keys=True, separators=(",", ":"))
        mac = crypto.fingerprint(account_key, canonical.encode())
        key = stored_idempotency_key(account_key, header)
        held = await self._claim(caller, key, mac, prefix)
        if isinstance(held, IdempotencyRecord):
            return await self._replay(held, mac, replay)
        return await self._run(caller, held, create)

    async def _run_unkeyed(self, caller: Caller, create: Create, prefix: str) -> dict[str, Any]:
        claim = Claim(time_ordered_id(prefix))
        try:
            return await create(claim)
        except BaseException:
            if claim.may_have_taken_effect:
                self._remember(caller, claim.effect_id)
            raise

    async def _run(self, caller: Caller, claim: Claim, create: Create) -> Outcome:
        record = claim.record
        assert record is not None
        assert record.token is not None
        try:
            try:
                body = await create(claim)
            except CardVaultError as exc:
                if getattr(exc, "consumes_idempotency_key", False) and claim.may_have_taken_effect:
                    await self._finish(
                        record, exc.http_status, _ERROR_MARK + exc.code, state=UNKNOWN
                    )
                else:
                    await self._let_go(caller, claim)
                raise
            except BaseException:
                await self._let_go(caller, claim)
                raise
            await self._finish(record, 200, str(body["id"]), state=DONE)
        finally:
            self._active.discard(record.token)
        return Outcome(body, replayed=False)

    async def _finish(self, record: IdempotencyRecord, status: int, body: str, state: str) -> None:
        """Store the answer. If that fails the request is still answered: its effect is
        made, and the claim, left to go stale, leads a retry to it."""
        try:
            await self.store.complete_idempotency_key(
                record.account_id, record.mode, record.key, status, body,
                token=record.token, state=state,
            )  # fmt: skip
        except Exception:
            _log.warning("could not store an idempotent answer; a retry will look for it")

    async def _let_go(self, caller: Caller, claim: Claim) -> None:
        """After a failed create: release the key when nothing was done; keep it (stale
        once this request is over) when the effect may have happened, for a retry or
        the settler to look."""
        record = claim.record
        assert record is not None
        if claim.may_have_taken_effect:
            return
        try:
            if claim.inherited and not claim.begun:
                # An earlier attempt under this effect id may have recorded it.
                await self._not_done(caller.key_id, record.account_id, record.mode, claim.effect_id)
            await self.store.release_idempotency_key(
                record.account_id, record.mode, record.key, token=record.token
            )
        except Exception:
            # Kept: stale once this request is over, so the next retry takes it over.
            _log.warning("could not release an idempotency key; a retry will take it over")

    # -- claiming, and taking over a stale claim --------------------------------------------

    def _token(self) -> str:
        """A new hold's token, counted as running in this process before it is stored:
        another request here must never see it stale."""
        token = secrets.token_urlsafe(12)
        self._active.add(token)
        return token

    def is_stale(self, record: IdempotencyRecord, now: int) -> bool:
        """Whether ``record``, claimed, will never be finished by its holder (module
        docstring)."""
        if record.state != CLAIMED:
            return False
        if record.lease_until is None or record.lease_until <= now:
            return True
        if record.owner != self.replica:
            return False
        return record.boot != self.boot or record.token not in self._active

    async def _claim(
        self, caller: Caller, key: str, mac: str, prefix: str
    ) -> Claim | IdempotencyRecord:
        """The key held by this request (a :class:`Claim`), or the record whose answer to
        replay. Raises 409 while another request holds it, 400 for other parameters."""
        for _ in range(_ATTEMPTS):
            now = int(self.clock())
            token = self._token()
            fresh = IdempotencyRecord(
                caller.account_id, caller.mode, key, mac, now,
                state=CLAIMED, owner=self.replica, boot=self.boot, token=token,
                lease_until=now + self.lease, effect_id=time_ordered_id(prefix),
            )  # fmt: skip
            try:
                existing = await self.store.claim_idempotency_key(fresh)
            finally:
                # Kept as running only if the claim is this request's (below).
                self._active.discard(token)
            if existing is None:
                self._active.add(token)
                assert fresh.effect_id is not None
                return Claim(fresh.effect_id, fresh)
            if existing.created < now - self.ttl:
                # Past its 24 hours: forgotten, and the key claimed afresh.
                await self.store.release_idempotency_key(
                    existing.account_id, existing.mode, existing.key, token=existing.token
                )
                continue
            if existing.state != CLAIMED:
                return existing
            if not self.is_stale(existing, now):
                if not hmac.compare_digest(existing.request_hash, mac):
                    raise IdempotencyError()
                raise IdempotencyKeyInUse()
            held = await self._take_over(caller.key_id, existing, mac, now, prefix)
            if held is not None:
                return held
            # Another request took it over first: look again.
        raise IdempotencyKeyInUse()

    async def _take_over(
        self, actor: str, stale: IdempotencyRecord, mac: str, now: int, prefix: str
    ) -> Claim | IdempotencyRecord | None:
        """Take ``stale`` over and look for its effect: the completed record when the
        effect exists, else this request's claim; None when another request took it
        over first."""
        token = self._token()
        mine = replace(
            stale, owner=self.replica, boot=self.boot, token=token, lease_until=now + self.lease
        )
        keep = False
        try:
            if not await self.store.take_over_idempotency_key(mine, stale.token or ""):
                return None
            found = await self._settle_effect(actor, mine)
            if found is not None:
                return found
            if mine.effect_id is not None and hmac.compare_digest(mine.request_hash, mac):
                # The same request again: run it under the same effect id, so that a
                # write of the first attempt still landing collides with it.
                keep = True
                return Claim(mine.effect_id, mine, inherited=True)
            # The first request never took effect: this one may use the key with its own
            # parameters, under a new effect id.
            if mine.effect_id is not None:
                await self._not_done(actor, mine.account_id, mine.mode, mine.effect_id)
            renewed = replace(mine, request_hash=mac, effect_id=time_ordered_id(prefix))
            if not await self.store.take_over_idempotency_key(renewed, token):
                return None
            keep = True
            assert renewed.effect_id is not None
            return Claim(renewed.effect_id, renewed)
        finally:
            if not keep:
                self._active.discard(token)

    # -- looking for an effect ----------------------------------------------------------

    async def _look(
        self, account_id: str, livemode: bool, effect_id: str
    ) -> PaymentMethodRecord | ForwardingRequestRecord | None:
        if effect_id.startswith("pm_"):
            return await self.store.get_payment_method(account_id, livemode, effect_id)
        if effect_id.startswith("fwdreq_"):
            return await self.store.get_forwarding_request(account_id, livemode, effect_id)
        return None

    async def _settle_effect(
        self, actor: str, record: IdempotencyRecord
    ) -> IdempotencyRecord | None:
        """If the effect of ``record`` (a claim held under ``record.token``) exists,
        complete the claim with it and return the completed record; else None. A forward
        found still pending is marked ``unknown``: its sender is gone."""
        if record.effect_id is None:
            return None
        found = await self._look(record.account_id, record.mode == "live", record.effect_id)
        if found is None:
            return None
        state = DONE
        if isinstance(found, ForwardingRequestRecord) and found.outcome != "completed":
            if found.outcome == PENDING:
                await self._forward_unknown(actor, found)
            state = UNKNOWN
        await self.store.complete_idempotency_key(
            record.account_id, record.mode, record.key, 200, found.id,
            token=record.token, state=state,
        )  # fmt: skip
        return replace(record, state=state, response_status=200, response_body=found.id)

    async def _forward_unknown(self, actor: str, fwd: ForwardingRequestRecord) -> None:
        """A pending forward whose sender is gone: the card may have reached the
        destination. Recorded, then marked ``unknown`` (never sent again)."""
        await self.audit.record(
            "forward.completed",
            actor=actor,
            object_id=fwd.id,
            result="outcome_unknown",
            detail={"destination": fwd.destination, "payment_method": fwd.payment_method},
        )
        if "card_cvc" in fwd.replacements:
            await self.audit.record(
                "cvc.destroyed",
                actor=actor,
                object_id=fwd.payment_method,
                detail={"reason": "used by a forward"},
            )
        await self.store.complete_forwarding_request(fwd.account_id, fwd.livemode, fwd.id, UNKNOWN)

    async def _not_done(
        self, actor: str, account_id: str, mode: Mode | str, effect_id: str
    ) -> None:
        """The follow-up record of an attempt whose effect never came: its
        ``payment_method.created`` (or ``forward.requested``) may stand in the log."""
        if effect_id.startswith("pm_"):
            action = "payment_method.not_stored"
        elif effect_id.startswith("fwdreq_"):
            action = "forward.not_sent"
        else:
            return
        await self.audit.record(
            action,
            actor=actor,
            object_id=effect_id,
            result="error",
            detail={"reason": "interrupted", "livemode": mode == "live"},
        )

    def _remember(self, caller: Caller, effect_id: str) -> None:
        """A create without an Idempotency-Key failed after its effect's write began:
        the settler looks for the effect once the lease has passed."""
        if len(self._unsettled) >= _MAX_UNSETTLED:
            oldest = next(iter(self._unsettled))
            del self._unsettled[oldest]
            _log.warning("too many creates of unknown outcome; one is no longer followed up")
        self._unsettled[effect_id] = _Unsettled(
            caller.account_id, caller.livemode, effect_id, int(self.clock())
        )

    # -- settling ---------------------------------------------------------------------

    async def settle_stale(self, *, limit: int = 500, shared: bool = True) -> int:
        """Settle what requests that will never finish left behind; the number settled.
        For the vault's start-up (after the store is migrated) and its periodic jobs;
        safe to run in several replicas at once. ``shared=False`` does only the last
        item below, which is this process's own (the periodic jobs of a process that
        does not lead them: the leader settles the database's for all).

        * A stale claim whose effect exists is completed (a forward still pending is
          marked ``unknown``), so a retry replays it.
        * A stale claim whose lease has run out with no effect is released, after the
          follow-up audit record (``payment_method.not_stored`` / ``forward.not_sent``)
          of the attempt. One whose owner is gone but whose lease still runs is left to
          the next request with the key (which takes it over at once) or to its lease.
        * A forward still pending ``lease`` seconds after it was made is marked
          ``unknown`` (recorded as ``forward.completed`` with result ``outcome_unknown``).
        * A create without an Idempotency-Key whose write failed with an unknown outcome
          is looked for once the lease has passed: absent, its follow-up is recorded.
        """
        now = int(self.clock())
        settled = 0
        if shared:
            settled += await self._settle_shared(now, limit)
        for item in list(self._unsettled.values()):
            if item.since > now - self.lease:
                continue
            try:
                found = await self._look(item.account_id, item.livemode, item.effect_id)
                if found is None:
                    mode = "live" if item.livemode else "test"
                    await self._not_done(_SETTLER, item.account_id, mode, item.effect_id)
                elif isinstance(found, ForwardingRequestRecord) and found.outcome == PENDING:
                    await self._forward_unknown(_SETTLER, found)
                del self._unsettled[item.effect_id]
                settled += 1
            except Exception:
                _log.exception("could not settle a create of unknown outcome; retrying later")
        return settled

    async def _settle_shared(self, now: int, limit: int) -> int:
        """The stale claims and pending forwards in the database (:meth:`settle_stale`'s
        first three items)."""
        settled = 0
        for record in await self.store.stale_idempotency_claims(
            now, self.replica, self.boot, limit=limit
        ):
            if not self.is_stale(record, now):
                continue
            try:
                settled += await self._settle_claim(record, now)
            except Exception:
                _log.exception("could not settle a stale idempotency claim; retrying later")
        for fwd in await self.store.pending_forwarding_requests(now - self.lease, limit=limit):
            try:
                await self._forward_unknown(_SETTLER, fwd)
                settled += 1
            except Exception:
                _log.exception("could not settle a pending forward; retrying later")
        return settled

    async def _settle_claim(self, record: IdempotencyRecord, now: int) -> int:
        if await self._settle_effect(_SETTLER, record) is not None:
            return 1
        if record.lease_until is not None and record.lease_until > now:
            return 0
        if record.effect_id is not None:
            await self._not_done(_SETTLER, record.account_id, record.mode, record.effect_id)
        released = await self.store.release_idempotency_key(
            record.account_id, record.mode, record.key, token=record.token
        )
        return int(released)

    # -- replaying -----------------------------------------------------------------------

    @staticmethod
    async def _replay(existing: IdempotencyRecord, mac: str, replay: Replay) -> Outcome:
        if not hmac.compare_digest(existing.request_hash, mac):
            raise IdempotencyError()
        if existing.response_status is None or existing.response_body is None:
            raise IdempotencyKeyInUse()
        if existing.response_body.startswith(_ERROR_MARK):
            replayed = error_class_for(existing.response_body[1:])()
            replayed.headers["Idempotent-Replayed"] = "true"
            raise replayed
        return Outcome(await replay(existing.response_body), replayed=True)
