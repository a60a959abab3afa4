"""A scripted HTTPS server in the test's own event loop, for the outbound client's
tests (forwards and webhook deliveries): each request's head and body are read, kept,
and handed to a script that writes whatever answer the test wants (or none)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

#: A server's script: given the request's head and body, write what it wants.
Script = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    """What the scripted server saw: connections opened, requests read (head, body)."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def heads(self) -> list[bytes]:
        return [head for head, _ in self.requests]


def answering(text: bytes) -> Script:
    """A script that writes ``text`` to every request."""

    async def script(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(text)

    return script


async def serve(context: ssl.SSLContext, script: Script) -> tuple[Server, asyncio.Server]:
    """Listen on 127.0.0.1 with TLS ``context``; requests need a Content-Length."""
    seen = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        seen.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                seen.requests.append((head, body))
                await script(head, body, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    seen.port = server.sockets[0].getsockname()[1]
    return seen, server
