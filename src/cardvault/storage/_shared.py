"""Small helpers both store implementations use."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["column_list", "copy_error", "settle"]


def column_list(names: tuple[str, ...]) -> str:
    """A column list for SQL, built only from the constant column names of
    :mod:`cardvault.storage.migrations`, never from input."""
    return ", ".join(names)


def copy_error(exc: BaseException) -> BaseException:
    """A fresh exception per caller, so that concurrent callers whose writes shared a
    batch do not share (and grow) one traceback."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:
        return exc
    copy.__cause__ = exc
    return copy


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Give a queued write's caller its outcome, unless the caller was cancelled."""
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
