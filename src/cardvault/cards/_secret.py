"""The base of the card-number and CVC types: digits in a buffer that can be wiped.

Why a ``bytearray``: a Python ``str`` is immutable, so its characters stay in memory
until the allocator happens to reuse them, and every slice or ``.replace()`` makes
another copy. A ``bytearray`` can be overwritten in place, so once a value has been
encrypted (or rejected) the digits are gone from this object. This is hygiene, not a
guarantee: the caller's original ``str`` (the form field) still exists until it is
collected, which is why the parser copies straight from it into the buffer and makes
no intermediate strings.
"""

from __future__ import annotations

import hmac
from types import TracebackType
from typing import Any, NoReturn, Self

__all__ = ["SecretDigits", "WipedError"]


class WipedError(RuntimeError):
    """A wiped card number or CVC was used. This is a bug in the caller."""


class SecretDigits:
    """ASCII digits in a wipeable buffer, that never print themselves.

    Subclasses choose the printed form (:meth:`_printable`). Instances are not
    hashable, cannot be pickled or copied, and compare in constant time.
    """

    __slots__ = ("_buf", "_wiped")

    _buf: bytearray
    _wiped: bool

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Construction goes through a validating parser; a bare constructor would let
        # unvalidated bytes become a "card number".
        raise TypeError(f"use {type(self).__name__}.parse() to build one")

    @classmethod
    def _adopt(cls, buf: bytearray) -> Self:
        """Wrap an already-validated buffer (which the new object now owns)."""
        self = object.__new__(cls)
        self._buf = buf
        self._wiped = False
        return self

    # --- the one way out -------------------------------------------------------------

    def digits_for_crypto(self) -> memoryview:
        """The ASCII digits as a read-only view, for encryption or fingerprinting only.

        The view shares the buffer: after :meth:`wipe` it reads zeros. Pass it straight
        to the cipher or HMAC; do not turn it into ``bytes`` or ``str``, which would make
        a copy that cannot be wiped.
        """
        self._check_live()
        return memoryview(self._buf).toreadonly()

    # --- wiping ----------------------------------------------------------------------

    def wipe(self) -> None:
        """Overwrite the digits with zero bytes. Idempotent."""
        buf = getattr(self, "_buf", None)
        if buf is not None:
            # A same-length slice assignment writes in place, and works even while a
            # view from digits_for_crypto() is still alive (a resize would not).
            buf[:] = bytes(len(buf))
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def _check_live(self) -> None:
        if self._wiped:
            raise WipedError(f"this {type(self).__name__} has been wiped")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    # --- never printed ---------------------------------------------------------------

    def _printable(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        # The printable form and nothing else: a repr ends up in tracebacks, debuggers
        # and log lines, so it follows the same rule as str().
        return self._printable()

    def __str__(self) -> str:
        return self._printable()

    def __format__(self, format_spec: str) -> str:
        return format(self._printable(), format_spec)

    # --- no comparison that leaks timing, no hashing, no copies ----------------------

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, SecretDigits)
        self._check_live()
        other._check_live()
        return hmac.compare_digest(self._buf, other._buf)

    # Defining __eq__ already sets __hash__ to None; say so for the reader. A hash of
    # the digits would be a cheap fingerprint, and the value is mutable (wipe).
    __hash__ = None  # type: ignore[assignment]

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # Pickling (and copy.copy, which uses the same protocol) would put the digits
        # in a byte string that nobody wipes, or on disk or a queue.
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    def __copy__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")
