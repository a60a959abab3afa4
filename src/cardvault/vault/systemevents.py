"""Events of no account's doing: ``key.rotated`` and ``audit.failed_closed``.

Every other event belongs to the account whose request made it. These two describe the
card environment itself, which every account's cards live in, so each is written once
to **every account, in test mode and in live mode** (one row per account and mode, all
in one transaction): each account reads it in its own ``GET /v1/events`` and gets it on
its own webhook endpoints subscribed to it (or to ``*``), and the delivery, the
retention and the signatures are those of any event. They say nothing of another
account, and nothing secret: which KEK, its new version, when; that the audit log
failed and how (``write_failed`` or ``broken``), never the error's text or a path.

* ``key.rotated`` (:meth:`SystemEvents.key_rotated`): ``cardvault keys rotate pan|cvc``
  rotates the KEK in the key service, then asks the vault (admin API, ``POST
  /v1/admin/keys/{kek}/rotated``) to take a data key under the new version at once.
  The vault's change is that data key's row, and the events are written in its
  transaction (the outbox rule): no event without the data key, no data key taken
  because of a rotation without its event. Their ids are derived from the account,
  the mode, the KEK and its version, so a second call for the same version (a retry)
  meets its own events in the store and writes none (the data key alone).
* ``audit.failed_closed`` (:meth:`SystemEvents.audit_failed_closed`): the first
  operation the vault refuses because its audit record cannot be written (503
  ``audit_unavailable``) writes the events, once per failure of the log
  (:class:`cardvault.audit.recorder.Recorder`). There is no change to put them in a
  transaction with: the change is the refusal. They are written to the store, which
  may still work when the audit log's disk does not; they carry no audit record of
  their own (there is none to be had: that is the failure). If the store fails too,
  the failure is only logged. They are delivered by whichever vault process leads the
  periodic jobs, when it runs: the failing process exits 74 within 5 s and its
  restart (or another worker) delivers them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, Final

from cardvault.logging import get_logger
from cardvault.storage.base import EventRecord, VaultStore
from cardvault.vault.events import Events
from cardvault.vault.ids import looks_like_id, time_ordered_id

__all__ = ["SystemEvents"]

_log = get_logger("cardvault.vault")

#: Accounts read per query while the events are made.
_PAGE: Final = 500
_BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def derived_event_id(*parts: str) -> str:
    """``evt_`` and 24 letters and digits from a SHA-256 of ``parts``: the same event
    id for the same facts, whoever writes it and however often."""
    number = int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest(), "big")
    symbols = []
    for _ in range(24):
        number, digit = divmod(number, 62)
        symbols.append(_BASE62[digit])
    event_id = "evt_" + "".join(symbols)
    assert looks_like_id(event_id, "evt_")
    return event_id


class SystemEvents:
    """Writing the events of the card environment itself (module docstring)."""

    def __init__(self, store: VaultStore, events: Events) -> None:
        self.store = store
        self.events = events

    async def for_every_account(
        self,
        type: str,
        obj: dict[str, Any],
        *,
        event_id: Callable[[str, bool], str] | None = None,
    ) -> list[EventRecord]:
        """The event ``type`` of ``obj`` for every account, in test and live mode,
        sealed, to be written in one transaction; ``event_id(account, livemode)``
        chooses each one's id (else a new one)."""
        made: list[EventRecord] = []
        after = ""
        while True:
            ids = await self.store.account_ids(after=after, limit=_PAGE)
            for account_id in ids:
                for livemode in (False, True):
                    chosen = None if event_id is None else event_id(account_id, livemode)
                    made.append(
                        await self.events.make(account_id, livemode, type, obj, event_id=chosen)
                    )
            if len(ids) < _PAGE:
                return made
            after = ids[-1]

    async def key_rotated(self, kek: str, version: int) -> list[EventRecord]:
        """The ``key.rotated`` events of ``kek`` now at ``version``, for the store write
        of the first data key under it."""
        obj = {"id": kek, "object": "key", "version": version, "rotated": int(time.time())}
        return await self.for_every_account(
            "key.rotated",
            obj,
            event_id=lambda account, live: derived_event_id(
                "key.rotated", kek, str(version), account, "live" if live else "test"
            ),
        )

    async def audit_failed_closed(self, reason: str) -> None:
        """Write the ``audit.failed_closed`` events (``reason``: ``write_failed`` or
        ``broken``); a failure to is logged, never raised (the caller is a report)."""
        obj = {
            "id": time_ordered_id("auditfail_"),
            "object": "audit_failure",
            "reason": reason,
            "failed_at": int(time.time()),
            "service": "vault",
        }
        try:
            records = await self.for_every_account("audit.failed_closed", obj)
            await self.store.insert_events(records)
        except Exception:
            _log.exception("the audit.failed_closed events could not be written")
            return
        _log.warning("audit.failed_closed events written", events=len(records), reason=reason)
