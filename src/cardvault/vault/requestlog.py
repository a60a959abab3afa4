"""The vault's request log in memory: the last access lines, for ``cardvault logs tail``.

Every request the vault answers writes one access line through the scrubbed structlog
chain (:class:`cardvault.transport.asgi.SecurityHeaders`). :class:`RequestLog` is a tap
on that chain (:func:`cardvault.logging.add_line_tap`): it keeps the last ``size``
(1,000) lines of the public listener as the chain rendered them, after the scrubber, so
what it serves is what the log file holds and never more (the access line names the
path, not the query string or the headers, and a card number in the path is already
``[REDACTED CARD NUMBER]``). Only a few fields of each line are kept (:data:`FIELDS`).

It is served on the admin API alone (mutual TLS, an operator identity):
``GET /v1/admin/request_log`` is a bounded long-poll. ``after`` is the cursor of the
previous answer; the answer holds the lines after it that pass the filters (``status``
``2XX``…``5XX`` or a code, ``method``, ``path`` (exact, or a prefix ending in ``*``),
``request_id``), at most ``limit`` (≤ 1000), waiting at most ``wait`` seconds (≤ 30)
for one to come.

Each process has its own buffer: with ``vault serve --workers N`` a poll is answered by
whichever worker accepted its connection, from that worker's lines. A cursor names the
buffer it belongs to (``<buffer id>.<sequence>``), and ``after`` may hold one per
worker (comma-separated, at most 16), so that a client that keeps every cursor it was
given is never shown a line twice; a poll that reaches a buffer it has no cursor for is
answered from ``since`` (Unix milliseconds) on. docs/api.md has how the command line
goes round the workers.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response

from cardvault.errors import InvalidRequestError, ParameterUnknown
from cardvault.transport.asgi import json_response
from cardvault.transport.identity import require_identity
from cardvault.vault.ids import new_id

__all__ = ["FIELDS", "MAX_LIMIT", "MAX_WAIT", "LineFilter", "RequestLog", "RequestLogHandler"]

#: The fields of an access line that are kept and served (each already scrubbed).
FIELDS: Final = (
    "timestamp",
    "method",
    "path",
    "status",
    "duration_ms",
    "request_id",
    "worker",
    "livemode",
)
#: The most lines one answer holds, and the longest wait of a poll (seconds): a poll
#: holds a connection of the admin listener, whose cap is per process.
MAX_LIMIT: Final = 1000
MAX_WAIT: Final = 30.0
DEFAULT_WAIT: Final = 25.0
#: The most cursors ``after`` may hold (one per worker), and the longest value of a
#: filter: every parameter the caller chooses is bounded.
MAX_CURSORS: Final = 16
_MAX_PATH = 512
_PARAMS: Final = frozenset(
    {"after", "since", "wait", "limit", "status", "method", "path", "request_id"}
)
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_RE = re.compile(r"([1-5])XX|[1-5][0-9][0-9]")
_CURSOR_RE = re.compile(r"(rl_[A-Za-z0-9]{1,32})\.([0-9]{1,18})")
_REQUEST_ID_RE = re.compile(r"req_[A-Za-z0-9_-]{1,64}")
#: A path filter: printable ASCII without spaces, as a request target's path is.
_PATH_RE = re.compile(r"/[\x21-\x7e]*")


@dataclass(frozen=True)
class LineFilter:
    """Which lines a poll wants; None: any."""

    status: str | None = None
    method: str | None = None
    path: str | None = None
    request_id: str | None = None

    def __call__(self, line: Mapping[str, Any]) -> bool:
        if self.status is not None:
            status = str(line.get("status", ""))
            if self.status.endswith("XX"):
                if status[:1] != self.status[0]:
                    return False
            elif status != self.status:
                return False
        if self.method is not None and line.get("method") != self.method:
            return False
        if self.path is not None:
            path = str(line.get("path", ""))
            if self.path.endswith("*"):
                if not path.startswith(self.path[:-1]):
                    return False
            elif path != self.path:
                return False
        return self.request_id is None or line.get("request_id") == self.request_id


class RequestLog:
    """The last ``size`` access lines of ``services`` (module docstring)."""

    def __init__(
        self,
        size: int = 1000,
        *,
        services: frozenset[str] = frozenset({"vault"}),
        workers: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.services = services
        self.workers = workers
        #: This buffer's name in cursors: a restarted worker starts a new one.
        self.id = new_id("rl_", 12)
        self._lines: deque[tuple[int, int, dict[str, Any]]] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        #: Set when the vault stops: open polls answer at once, so that none holds the
        #: shutdown up (cardvault.vault.app.run sets it).
        self.stopping = asyncio.Event()

    # -- writing (the tap) ----------------------------------------------------------------

    def tap(self, line: Mapping[str, Any]) -> None:
        """Keep ``line`` if it is an access line of one of :attr:`services`."""
        if line.get("logger") != "cardvault.access" or line.get("service") not in self.services:
            return
        kept = {name: line[name] for name in FIELDS if name in line}
        at = time.time_ns() // 1_000_000
        with self._lock:
            self._seq += 1
            self._lines.append((self._seq, at, kept))
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    # -- reading ---------------------------------------------------------------------------

    def cursor(self, seq: int | None = None) -> str:
        return f"{self.id}.{self._seq if seq is None else seq}"

    def _scan(
        self, after: int | None, since: int | None, wanted: LineFilter, limit: int
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """The lines after ``after`` (or from ``since`` on, or none before now) that
        pass ``wanted``, at most ``limit``; the sequence to go on from; whether more
        passed."""
        with self._lock:
            lines = list(self._lines)
            last = self._seq
        if after is None and since is None:
            return [], last, False
        if after is not None:
            # A cursor past this buffer's end (forged, say) must not hide what comes.
            after = min(max(after, 0), last)
        found: list[dict[str, Any]] = []
        reached = last if after is None else after
        for seq, at, line in lines:
            if after is not None and seq <= after:
                continue
            if after is None and since is not None and at < since:
                continue
            if not wanted(line):
                reached = seq
                continue
            if len(found) == limit:
                return found, reached, True
            found.append(line)
            reached = seq
        return found, max(reached, last), False

    async def read(
        self,
        *,
        after: int | None,
        since: int | None,
        wanted: LineFilter,
        limit: int,
        wait: float,
    ) -> tuple[list[dict[str, Any]], str, bool]:
        """The next lines that pass ``wanted``, waiting up to ``wait`` seconds for one:
        ``(lines, cursor, has_more)``."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        while True:
            changed = self._changed
            if changed is None:
                changed = self._changed = asyncio.Event()
            found, reached, more = self._scan(after, since, wanted, limit)
            left = deadline - time.monotonic()
            if found or left <= 0 or self.stopping.is_set():
                return found, self.cursor(reached), more
            after, since = reached, None
            waits = [
                asyncio.ensure_future(changed.wait()),
                asyncio.ensure_future(self.stopping.wait()),
            ]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for each in waits:
                    each.cancel()


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequestError(f"{name} may be given once.", param=name)
    return values[0]


def _number(value: str | None, name: str, low: float, high: float, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value) if len(value) <= 20 else float("nan")
    except ValueError:
        number = float("nan")
    if not low <= number <= high:  # NaN fails too
        raise InvalidRequestError(f"{name} must be a number from {low:g} to {high:g}.", param=name)
    return number


def parse_poll(
    query: Mapping[str, list[str]], buffer_id: str
) -> tuple[int | None, int | None, LineFilter, int, float]:
    """A poll's parameters, each checked and bounded: ``(after, since, filter, limit,
    wait)``. ``after``: this buffer's cursor among those given."""
    for name in query:
        if name not in _PARAMS:
            raise ParameterUnknown(param=name[:64])
    after: int | None = None
    raw_after = _one(query, "after")
    if raw_after:
        tokens = raw_after.split(",")
        if len(tokens) > MAX_CURSORS or len(raw_after) > MAX_CURSORS * 64:
            raise InvalidRequestError(f"after holds at most {MAX_CURSORS} cursors.", param="after")
        for token in tokens:
            match = _CURSOR_RE.fullmatch(token)
            if match is None:
                raise InvalidRequestError(
                    "after must be cursors of earlier answers, comma-separated.", param="after"
                )
            if match.group(1) == buffer_id:
                after = int(match.group(2))
    raw_since = _one(query, "since")
    since = None
    if raw_since:
        if not raw_since.isdigit() or len(raw_since) > 15:
            raise InvalidRequestError("since must be a Unix time in milliseconds.", param="since")
        since = int(raw_since)
    limit = int(_number(_one(query, "limit"), "limit", 1, MAX_LIMIT, 100))
    wait = _number(_one(query, "wait"), "wait", 0, MAX_WAIT, DEFAULT_WAIT)
    status = _one(query, "status") or None
    if status is not None:
        status = status.upper()
        if not _STATUS_RE.fullmatch(status):
            raise InvalidRequestError(
                "status must be 1XX, 2XX, 3XX, 4XX, 5XX or a status code.", param="status"
            )
    method = _one(query, "method") or None
    if method is not None:
        method = method.upper()
        if method not in _METHODS:
            raise InvalidRequestError(
                "method must be one of " + ", ".join(sorted(_METHODS)) + ".", param="method"
            )
    path = _one(query, "path") or None
    if path is not None and (len(path) > _MAX_PATH or not _PATH_RE.fullmatch(path)):
        raise InvalidRequestError(
            f"path must be a URL path starting with / (at most {_MAX_PATH} characters), "
            "perhaps ending in * for a prefix.",
            param="path",
        )
    request_id = _one(query, "request_id") or None
    if request_id is not None and not _REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidRequestError("request_id must be a req_ id.", param="request_id")
    return after, since, LineFilter(status, method, path, request_id), limit, wait


class RequestLogHandler:
    """``GET /v1/admin/request_log``: mutual TLS, the allowed identities only."""

    def __init__(self, log: RequestLog, allowed_identities: frozenset[str]) -> None:
        self.log = log
        self.allowed = allowed_identities

    async def poll(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        query: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            query.setdefault(name, []).append(value)
        after, since, wanted, limit, wait = parse_poll(query, self.log.id)
        lines, cursor, more = await self.log.read(
            after=after, since=since, wanted=wanted, limit=limit, wait=wait
        )
        return json_response(
            {
                "object": "list",
                "url": "/v1/admin/request_log",
                "data": lines,
                "has_more": more,
                "cursor": cursor,
                "buffer": {"id": self.log.id, "size": self.log.size},
                "workers": self.log.workers,
            },
            headers={"cache-control": "no-store"},
        )
