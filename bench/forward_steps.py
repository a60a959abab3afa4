"""What a forward costs, step by step: wall and CPU time of each step at concurrency 1.

Runs the vault's ASGI application *in this process* (as ``instructions.py`` does: no TLS
and no HTTP parsing into the vault; the application, its SQLite store, its audit log and
its access log configured as in production) against a real key service and the
simulated acquirer (``examples/acquirer``, HTTPS), the deployment of ``forward.py``
(same allowlist, same payment methods: the test card, no CVC, ``card_number`` and
``card_expiry``). After a warm-up, ``--count`` forwards are sent one after the other,
each timed step by step by wrappers around the forwarder's methods: the wall time
(what the caller waits for) and the process's CPU time (at concurrency 1 nothing else
runs in the process, so it is the step's own).

The steps, in order:

* handler: what the request pays outside the forwarder (request id, routing, API key,
  rate limit, the form parsed, the answer rendered, the access-log line);
* checks: the parameters and the URL matched against the allowlist;
* lookup: the payment method read from the store;
* open: the data key and the card number decrypted;
* build: the request to send and its masked copy, and the pending record;
* durable before sending: ``forward.requested`` in the audit log and the pending
  forwarding record in the store, both durable (audit fsync, SQLite commit);
* send: the request to the acquirer on the pooled connection and its answer read;
* answer: the answer decoded and masked;
* durable completion: the forwarding record completed and ``forward.completed``, both
  durable;
* the rest of the forward (what is between the steps).

It also counts, per forward, the audit log's fsyncs and the store's commits.

    .venv/bin/python bench/forward_steps.py --count 2000
    PYTHONPATH=/tmp/cv-before/src .venv/bin/python bench/forward_steps.py   # another tree

With ``--profile FILE`` the measured forwards run under cProfile (the timings are then
not comparable); read it with ``python -m pstats FILE``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from _common import cardvault_process, run_cardvault, wait_for_port
from forward import (
    TEST_CARD,
    create_account,
    forward_body_list,
    python_process,
    write_deployment,
)
from instructions import _exchange

STEPS = (
    "handler",
    "checks",
    "lookup",
    "open",
    "build",
    "durable before sending",
    "send",
    "answer",
    "durable completion",
    "rest of the forward",
)


class Clock:
    """Wall and CPU time per step, added up over the measured forwards."""

    def __init__(self) -> None:
        self.on = False
        self.wall: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)
        #: Time marks of the forward under way (wall, cpu), by name.
        self.marks: dict[str, tuple[float, float]] = {}

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, step: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        if self.on:
            self.wall[step] += end[0] - start[0]
            self.cpu[step] += end[1] - start[1]


def timed(clock: Clock, owner: Any, name: str, *, step: str | None, mark: str | None) -> None:
    """Wrap ``owner.name``: add its time to ``step`` (None: do not), and keep the time it
    started and ended as ``mark + " start"`` and ``mark + " end"``."""
    original = getattr(owner, name)
    is_async = inspect.iscoroutinefunction(original)

    def before() -> tuple[float, float]:
        start = clock.now()
        if mark:
            clock.marks[mark + " start"] = start
        return start

    def after(start: tuple[float, float]) -> None:
        end = clock.now()
        if mark:
            clock.marks[mark + " end"] = end
        if step:
            clock.add(step, start, end)

    if is_async:

        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = before()
            try:
                return await original(*args, **kwargs)
            finally:
                after(start)

    else:

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = before()
            try:
                return original(*args, **kwargs)
            finally:
                after(start)

    setattr(owner, name, wrapper)


def instrument(clock: Clock) -> Callable[[], None]:
    """Wrap the steps; returns what closes a forward's account (the derived steps)."""
    from cardvault.transport import asgi
    from cardvault.vault.forwarding import forwarder as module
    from cardvault.vault.forwarding import outbound

    fwd = module.Forwarder
    timed(clock, asgi.SecurityHeaders, "__call__", step=None, mark="request")
    timed(clock, fwd, "create", step=None, mark="create")
    timed(clock, fwd, "_read", step="checks", mark=None)
    timed(clock, module, "find_payment_method", step="lookup", mark=None)
    timed(clock, fwd, "_open", step="open", mark=None)
    timed(clock, fwd, "_outbound", step=None, mark="outbound")
    timed(clock, fwd, "_pending", step=None, mark="pending")
    timed(clock, fwd, "_start", step=None, mark="start")
    timed(clock, outbound.OutboundClient, "send", step="send", mark="send")
    timed(clock, fwd, "_keep", step="durable completion", mark="keep")

    def close() -> None:
        m = clock.marks
        # The build: from the request to send to the pending record (the masked copy
        # was built between them before issue 21, and within _outbound after).
        clock.add("build", m["outbound start"], m["pending end"])
        clock.add("durable before sending", m["pending end"], m["start end"])
        clock.add("answer", m["send end"], m["keep start"])
        create = (m["create start"], m["create end"])
        inside = sum(clock.wall[s] for s in STEPS if s not in ("handler", "rest of the forward"))
        inside_cpu = sum(clock.cpu[s] for s in STEPS if s not in ("handler", "rest of the forward"))
        clock.wall["_create"] += create[1][0] - create[0][0]
        clock.cpu["_create"] += create[1][1] - create[0][1]
        clock.wall["_request"] += m["request end"][0] - m["request start"][0]
        clock.cpu["_request"] += m["request end"][1] - m["request start"][1]
        clock.wall["_inside"] = inside
        clock.cpu["_inside"] = inside_cpu

    return close


async def post(app: Any, path: str, body: bytes, key: str) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"authorization", b"Bearer " + key.encode()),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
        "extensions": {},
    }
    receive, send, statuses = _exchange(body)
    await app(scope, receive, send)
    if statuses != [200]:
        raise RuntimeError(f"{path} answered {statuses}")
    return statuses[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="measured forwards (2000)")
    parser.add_argument("--warmup", type=int, default=300, help="forwards first (300)")
    parser.add_argument("--profile", type=Path, help="run the measured forwards under cProfile")
    args = parser.parse_args()

    from cardvault.audit.recorder import open_audit_log
    from cardvault.config import load_settings
    from cardvault.logging import configure_logging
    from cardvault.vault import app as vault_app
    from cardvault.vault.settings import VaultSettings

    directory = Path(tempfile.mkdtemp(prefix="cardvault-forward-steps-"))
    try:
        deployment = write_deployment(directory)
        keyd_log = directory / "keyd.log"
        run_cardvault(["keyservice", "init", "--config", str(deployment.keyd_config)], log=keyd_log)
        key = create_account(deployment.vault_config, directory / "accounts.log")
        settings = load_settings(VaultSettings, deployment.vault_config)
        with (
            python_process(deployment.acquirer_args, log=directory / "acquirer.log") as acq,
            cardvault_process(
                ["keyservice", "serve", "--config", str(deployment.keyd_config)], log=keyd_log
            ) as keyd,
            open(directory / "vault.log", "w") as log,
        ):
            wait_for_port(deployment.keyd_port, keyd, log=keyd_log)
            wait_for_port(deployment.acquirer_port, acq, log=directory / "acquirer.log")
            # The production configuration: JSON lines at info, to a file.
            configure_logging(profile="production", level="info", fmt="json", stream=log)
            service = vault_app.build_vault(settings)
            assert service is not None
            app = vault_app.build_listeners(settings, service)[0].app
            clock = Clock()
            close = instrument(clock)
            counts: dict[str, float] = {}

            async def run() -> None:
                directory_, _ = settings.audit.resolved(settings.store.url)
                service.audit.log = await open_audit_log(directory_, settings.audit)
                await service.store.migrate()
                form = urlencode(
                    {"type": "card", "card[number]": TEST_CARD, "card[exp_month]": "12",
                     "card[exp_year]": "2034"}
                ).encode()  # fmt: skip
                for _ in range(20):
                    await post(app, "/v1/payment_methods", form, key)
                with sqlite3.connect(directory / "vault" / "vault.db") as db:
                    pms = [str(r[0]) for r in db.execute("SELECT id FROM payment_methods")]
                bodies = forward_body_list(deployment, pms)
                path = "/v1/forwarding/requests"
                for i in range(args.warmup):
                    await post(app, path, bodies[i % len(bodies)], key)
                audit_log = service.audit.log
                fsyncs0 = audit_log.fsyncs if audit_log is not None else 0
                commits0 = getattr(service.store, "_commits", 0)
                profile = cProfile.Profile() if args.profile else None
                if profile is not None:
                    profile.enable()
                clock.on = True
                for i in range(args.count):
                    clock.marks.clear()
                    await post(app, path, bodies[i % len(bodies)], key)
                    close()
                clock.on = False
                if profile is not None:
                    profile.disable()
                    profile.dump_stats(args.profile)
                counts["fsyncs"] = (audit_log.fsyncs if audit_log is not None else 0) - fsyncs0
                counts["commits"] = getattr(service.store, "_commits", 0) - commits0
                await service.audit.close()
                await service.keys.keys.close()
                await service.forwarder.outbound.close()
                await service.store.close()

            import uvloop

            uvloop.run(run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    n = args.count
    wall, cpu = clock.wall, clock.cpu
    wall["handler"] = wall["_request"] - wall["_create"]
    cpu["handler"] = cpu["_request"] - cpu["_create"]
    wall["rest of the forward"] = wall["_create"] - wall["_inside"]
    cpu["rest of the forward"] = cpu["_create"] - cpu["_inside"]
    print(
        f"a forward, step by step: {n:,} forwards one after the other, in process "
        f"(no TLS or HTTP into the vault); mean µs per forward"
    )
    print(f"{'step':<26} {'wall µs':>9} {'CPU µs':>9}")
    for step in STEPS:
        print(f"{step:<26} {wall[step] * 1e6 / n:>9,.0f} {cpu[step] * 1e6 / n:>9,.0f}")
    print(
        f"{'whole request':<26} {wall['_request'] * 1e6 / n:>9,.0f} {cpu['_request'] * 1e6 / n:>9,.0f}"
    )
    print(
        f"per forward: audit fsyncs {counts['fsyncs'] / n:.2f}, store commits "
        f"{counts['commits'] / n:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
