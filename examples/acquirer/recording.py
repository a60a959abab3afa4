"""TEST FEATURE OF A SIMULATOR: record every request, card numbers included.

:class:`Recorder` is ASGI middleware that reads each request body (up to a limit),
appends one JSON line to ``STATE/received.jsonl`` *before* the application answers (so
a test that got its response can read the record at once), and replays the body to the
application. The file is created with mode 0600 and re-checked on every write; it is
never opened through a symbolic link.

A record::

    {"time": "2025-01-01T00:00:00+00:00", "request_id": "req_...",
     "method": "POST", "path": "/v1/authorizations", "query": "",
     "headers": {"content-type": "application/json", ...},   # names in lower case
     "body": "<the raw body, as UTF-8>",                     # null if not UTF-8
     "body_base64": null,                                    # the raw bytes then
     "body_size": 123, "truncated": false}

Repeated headers are joined with ``", "``. ``body_size`` counts the bytes read. A body
longer than the limit is recorded up to the limit with ``"truncated": true`` (reading
stops there, so ``body_size`` is then a lower bound) and answered ``413``.

Nothing here is logged: the records go to their file and nowhere else.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cardvault.errors import RequestTooLarge
from cardvault.transport.asgi import error_response

__all__ = ["RECEIVED_FILE", "Recorder", "append_record", "read_records"]

RECEIVED_FILE = "received.jsonl"
_FILE_MODE = 0o600


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _record(scope: Scope, body: bytes, *, size: int, truncated: bool) -> dict[str, Any]:
    try:
        text: str | None = body.decode("utf-8")
        b64: str | None = None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(body).decode("ascii")
    return {
        "time": datetime.now(UTC).isoformat(),
        "request_id": scope.get("state", {}).get("request_id"),
        "method": scope.get("method"),
        "path": scope.get("path"),
        "query": (scope.get("query_string") or b"").decode("latin-1"),
        "headers": _headers(scope),
        "body": text,
        "body_base64": b64,
        "body_size": size,
        "truncated": truncated,
    }


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` (created 0600; a symlink is refused)."""
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    fd = os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE
    )
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != _FILE_MODE:
            os.fchmod(fd, _FILE_MODE)
        # One write of the whole line, on an O_APPEND descriptor: lines never interleave.
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record in ``path`` (an empty list if there is none yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


class Recorder:
    """ASGI middleware: record each HTTP request (see the module docstring).

    It runs inside :class:`cardvault.transport.asgi.SecurityHeaders`, so its own ``413``
    carries the security headers and the record carries the request id. Requests in
    ``skip`` (``(method, path)`` pairs: the health check, the record API) pass untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        path: Path,
        max_body: int,
        skip: Collection[tuple[str, str]] = (),
    ) -> None:
        self.app = app
        self.path = path
        self.max_body = max_body
        self.skip = frozenset(skip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.skip:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        truncated = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing was received
            chunk: bytes = message.get("body", b"")
            if size + len(chunk) > self.max_body:
                chunks.append(chunk[: self.max_body - size])
                size += len(chunk)
                truncated = True
                break
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        append_record(self.path, _record(scope, body, size=size, truncated=truncated))
        if truncated:
            await error_response(RequestTooLarge())(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
