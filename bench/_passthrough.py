"""A bare HTTPS pass-through, the floor for forwarding: what any Python hop adds.

``bench/forward.py`` runs it beside the vault as a third case. It is the vault's
transport with nothing of the vault in it: cardvault's TLS server context on uvicorn
(uvloop, httptools), a raw ASGI app with no framework, middleware, authentication,
logging or storage, and one pooled aiohttp session to the acquirer, verifying its
certificate against the deployment CA as the vault does. Each request's body is sent on
to ``--target`` unchanged and the answer is returned as it came.

    python bench/_passthrough.py --port P --cert C --key K --ca CA --target URL
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import aiohttp

from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import client_context, server_context


def make_app(target: str, ca: Path) -> Any:
    sessions: list[aiohttp.ClientSession] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    for session in sessions:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if not sessions:
            connector = aiohttp.TCPConnector(ssl=client_context(ca), limit=100)
            sessions.append(aiohttp.ClientSession(connector=connector, trust_env=False))
        async with sessions[0].post(
            target, data=b"".join(chunks), headers={"content-type": "application/json"}
        ) as response:
            body = await response.read()
            status = response.status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--target", required=True)
    args = parser.parse_args()
    app = make_app(args.target, args.ca)
    run_until_stopped(
        [Listener("passthrough", app, "127.0.0.1", args.port, server_context(args.cert, args.key))]
    )


if __name__ == "__main__":
    main()
