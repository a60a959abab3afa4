"""The vault store's lists, written once for both backends: each page as SQL, and the
two list methods (:class:`VaultLists`), which a backend's store inherits.

Lists are scoped to one account and mode, newest first (``created``, then ``id``,
descending), with Stripe's cursors: ``starting_after`` gives the page after that
object, ``ending_before`` the page before it (still newest first: the query reads the
nearest ones first, and the rows are reversed afterwards). A cursor is looked up within
the same account and mode, so an id from elsewhere matches nothing and the page is
empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cardvault.storage import rows
from cardvault.storage.base import ForwardingRequestRecord, PaymentMethodRecord

__all__ = ["Page", "VaultLists", "page_query"]

R = TypeVar("R")


@dataclass(frozen=True)
class Page:
    #: The statement, in SQLite's ``?`` placeholders.
    sql: str
    params: tuple[Any, ...]
    #: The rows come nearest first: reverse them.
    reverse: bool


def page_query(
    table: str,
    select: str,
    account_id: str,
    livemode: bool,
    limit: int,
    starting_after: str | None = None,
    ending_before: str | None = None,
) -> Page:
    """One page of ``table``, whose rows ``select`` reads (module docstring)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if starting_after is not None and ending_before is not None:
        raise ValueError("give starting_after or ending_before, not both")
    scope = (account_id, bool(livemode))
    where = "account_id = ? AND livemode = ?"
    if starting_after is None and ending_before is None:
        sql = f"{select} WHERE {where} ORDER BY created DESC, id DESC LIMIT ?"
        return Page(sql, (*scope, limit), reverse=False)
    # Built only from the constant table names of storage.rows, never from input.
    cursor = f"(SELECT created, id FROM {table} WHERE id = ? AND {where})"  # noqa: S608
    if starting_after is not None:
        order = f"(created, id) < {cursor} ORDER BY created DESC, id DESC"
        params: tuple[Any, ...] = (*scope, starting_after, *scope, limit)
    else:
        order = f"(created, id) > {cursor} ORDER BY created ASC, id ASC"
        params = (*scope, ending_before, *scope, limit)
    return Page(f"{select} WHERE {where} AND {order} LIMIT ?", params, ending_before is not None)


class VaultLists:
    """``list_payment_methods`` and ``list_forwarding_requests`` of
    :class:`~cardvault.storage.base.VaultStore`, for a backend that runs a page."""

    async def _list(self, page: Page, from_row: Callable[[Any], R]) -> list[R]:
        """The records of ``page``, in its order (reversed when it says so)."""
        raise NotImplementedError

    async def list_payment_methods(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[PaymentMethodRecord]:
        page = page_query(
            "payment_methods", rows.SELECT_PAYMENT_METHOD,
            account_id, livemode, limit, starting_after, ending_before,
        )  # fmt: skip
        return await self._list(page, rows.payment_method_from_row)

    async def list_forwarding_requests(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[ForwardingRequestRecord]:
        page = page_query(
            "forwarding_requests", rows.SELECT_FORWARDING,
            account_id, livemode, limit, starting_after, ending_before,
        )  # fmt: skip
        return await self._list(page, rows.forwarding_from_row)
