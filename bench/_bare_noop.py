"""A bare uvicorn + Starlette no-op over the vault's TLS context: what the vault's own
``POST /v1/noop`` is compared with.

``bench/forward.py`` runs it beside the vault, as ``_passthrough.py`` is run for
forwarding. It is stock uvicorn (uvloop, httptools, its own HTTP protocol) serving the
TLS server context the vault builds (``cardvault.transport.tls.server_context``, the
same certificate), and a Starlette application with one route that answers
``{"object":"noop"}``: no middleware, security headers, request id, authentication or
logging (uvicorn's access log is off). The vault's no-op over it is the cost of the
vault's pipeline: its transport protocol and limits, the security headers, the request
id, the routes, the error handling and the access-log line.

    python bench/_bare_noop.py --port P --cert C --key K
"""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cardvault.transport.tls import server_context


async def noop(_request: Request) -> Response:
    return JSONResponse({"object": "noop"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = server_context(args.cert, args.key)
    app = Starlette(routes=[Route("/v1/noop", noop, methods=["GET", "POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        ws="none",
        log_level="warning",
        access_log=False,
        server_header=False,
        ssl_context_factory=lambda _config, _default: context,
    )
    # uvicorn raises a SIGTERM again once it has shut down: exit 0 then, as the
    # services do.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
