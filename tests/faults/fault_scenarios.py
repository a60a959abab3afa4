"""The faults, and the scenarios that inject them under load.

Each scenario takes its sizes as arguments: the tests run them small (a few seconds
each), ``bench/faults.py`` large, and both read the same :class:`~faults_support.Result`.
A scenario never asserts: it lists what it expected of the fault and did not see in
``Result.problems`` (a fault that had no effect proves nothing, so "no request met the
outage" is a problem too), and the common check (:func:`faults_support.check`) does
the rest.

The stack (:func:`fault_stack`) is the usual one (:func:`stack.run_stack`: the key
service and the vault as real processes over TLS with the test CA) with what the faults
need: the vault's audit directory on a tmpfs of its own when the tests run as root (so
that it can be filled for real), the ENOSPC hook (``inject/sitecustomize.py``) in the
vault's environment in every case, a forwarding destination whose behaviour the
scenario sets (:class:`Destination`), and data keys that serve 20 encryptions each
(``[datakeys] max_uses``), so that tokenizations keep asking the key service for keys
and notice when it is gone.

PostgreSQL faults touch only the test's own database: its backends are ended with
``pg_terminate_backend`` and new connections refused with ``ALLOW_CONNECTIONS false``
(always set back); the server is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from faults_support import (
    OPEN_LIMITS,
    REPLAY_SAMPLE,
    Ledger,
    Load,
    Result,
    audit_records,
    check,
    https_client,
    tokenize,
    wait_until,
)

from cardvault.audit.recorder import AUDIT_FAILED_EXIT, AUDIT_FAILURE_GRACE
from cardvault.transport.tls import client_context, server_context
from helpers import Pki, free_ports
from stack import Stack, run_stack, vault_database

__all__ = [
    "FORWARD_MODES",
    "Destination",
    "FaultStack",
    "audit_full",
    "fault_stack",
    "forwards",
    "keyservice_down",
    "postgres_outage",
    "postgres_terminated",
    "seal_keyservice",
    "vault_killed",
]

INJECT = Path(__file__).resolve().parent / "inject"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The vault's seconds to wait for the fast destination; the slow one's.
DESTINATION_TIMEOUT = 1.0
SLOW_DESTINATION_TIMEOUT = 20.0
#: The CVC every card of the forwarding scenario is created with.
CVC = "314"


class TempFactory(Protocol):
    """What :func:`fault_stack` needs of pytest's ``tmp_path_factory``."""

    def mktemp(self, basename: str) -> Path: ...


# --- the stack ----------------------------------------------------------------------------


@dataclass
class FaultStack:
    """A stack with its faults at hand."""

    stack: Stack
    pki: Pki
    destination: Destination
    #: The file whose presence makes the audit directory full (the ENOSPC hook).
    enospc_flag: Path
    #: Whether the audit directory is a tmpfs of its own; if not, why.
    tmpfs: bool
    tmpfs_reason: str = ""
    #: Whether the check retries every acknowledged request with its key, not a sample.
    replay_all: bool = False

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    @property
    def secret(self) -> str:
        return self.stack.accounts[0]["sk"]

    def ledger(self, scenario: str, *, cvc: str | None = None) -> Ledger:
        return Ledger(scenario, self.secret, self.stack.accounts[0]["account"], cvc=cvc)

    # The audit directory full, two ways.

    def fill_audit(self, kind: str) -> None:
        """Make the audit directory full: ``tmpfs`` fills its file system to the last
        byte; ``enospc`` turns the injected ENOSPC on."""
        audit = self.stack.audit_dir
        if kind == "enospc":
            self.enospc_flag.write_text(str(audit.resolve()))
            return
        assert self.tmpfs, self.tmpfs_reason
        with open(audit / "filler", "wb", buffering=0) as fh:
            for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
                while True:
                    try:
                        fh.write(b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def free_audit(self) -> None:
        """Space again, both ways."""
        self.enospc_flag.unlink(missing_ok=True)
        (self.stack.audit_dir / "filler").unlink(missing_ok=True)

    def heal(self) -> None:
        """Undo what a scenario that failed half-way may have left: space in the audit
        directory, both services running, the destination down."""
        self.free_audit()
        self.destination.set("down")
        for service in ("keyservice", "vault"):
            if self.stack.processes[service].poll() is not None:
                self.stack.start(service)


def _allowlist(path: Path, port: int, ca_file: Path) -> None:
    placements = (
        "[destination.placements]\n"
        'card_number = { json = "/card/number" }\n'
        'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
        'card_cvc = { json = "/card/cvc" }\n'
    )
    entries = []
    for name, url_path, timeout in (
        ("faults", "/v1/authorizations", DESTINATION_TIMEOUT),
        ("faults-slow", "/v1/slow", SLOW_DESTINATION_TIMEOUT),
    ):
        entries.append(
            f'[[destination]]\nname = "{name}"\nurl = "https://localhost:{port}{url_path}"\n'
            'methods = ["POST"]\nreplacements = ["card_number", "card_expiry", "card_cvc"]\n'
            f'accounts = ["*"]\nca_file = "{ca_file}"\ntimeout = {timeout}\n{placements}'
        )
    path.write_text("\n".join(entries))


def _mount_tmpfs(path: Path, size: str) -> str:
    """``path`` on a tmpfs of its own: "" when mounted, else why not."""
    if os.geteuid() != 0:
        return "not root: a tmpfs cannot be mounted (the injected ENOSPC variant runs instead)"
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if done.returncode == 0 else f"mount failed: {done.stderr.strip()}"


@contextlib.contextmanager
def fault_stack(
    tmp: TempFactory, pki: Pki, backend: str, *, tmpfs_size: str = "64m"
) -> Iterator[FaultStack]:
    """The stack of the module docstring, on SQLite or on a PostgreSQL database of its
    own (dropped afterwards); the tmpfs is unmounted afterwards."""
    d = tmp.mktemp(f"faults-{backend}")
    for name in ("keyd", "destination"):
        if not pki.cert(name)[0].exists():
            pki.ca.issue(name, dns=["localhost"], ips=["127.0.0.1"])
    rogue = pki.rogue.issue("destination-rogue", dns=["localhost"], ips=["127.0.0.1"])
    (port,) = free_ports(1)
    destination = Destination(
        port, trusted=pki.cert("destination"), untrusted=(rogue.cert_path, rogue.key_path)
    )
    allowlist = d / "allowlist.toml"
    _allowlist(allowlist, port, pki.ca_file)
    flag = d / "enospc"
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(INJECT), os.environ.get("PYTHONPATH")) if p),
        "FAULTS_ENOSPC_FLAG": str(flag),
    }
    mounted: list[Path] = []
    why: list[str] = []

    def prepare(stack_dir: Path) -> None:
        reason = _mount_tmpfs(stack_dir / "audit", tmpfs_size)
        if reason:
            why.append(reason)
        else:
            mounted.append(stack_dir / "audit")

    vault_toml = f'[datakeys]\nmax_uses = 20\n[forwarding]\nallowlist_file = "{allowlist}"\n'
    try:
        with (
            vault_database(backend, d) as dsn,
            contextlib.contextmanager(run_stack)(
                tmp, pki, backend, dsn,  # type: ignore[arg-type]
                limits=OPEN_LIMITS, vault_toml=vault_toml, vault_env=env, prepare=prepare,
            ) as stack,
        ):  # fmt: skip
            yield FaultStack(stack, pki, destination, flag, bool(mounted), "".join(why))
    finally:
        destination.close()
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


# --- a forwarding destination -------------------------------------------------------------


class Destination:
    """An allowlisted HTTPS destination on a fixed port, doing what the scenario says:

    * ``down``: nothing listens (connection refused);
    * ``answer``: reads the request and answers ``status`` with a small JSON body;
    * ``hang``: reads the request and never answers (until the mode changes);
    * ``reset``: reads the request and resets the connection without answering;
    * ``untrusted``: serves a certificate of another CA, so the vault's handshake fails
      before it writes a byte.

    Every request read is kept (in memory only: it holds the test card's number and
    CVC), by the ``reference`` of its JSON body, so a test can count how many times a
    forward reached it. Connections are closed after each answer."""

    def __init__(
        self, port: int, *, trusted: tuple[Path, Path], untrusted: tuple[Path, Path]
    ) -> None:
        self.port = port
        self.mode = "down"
        self.status = 200
        self._contexts = {
            "trusted": server_context(*trusted),
            "untrusted": server_context(*untrusted),
        }
        self._received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._release = threading.Event()

    def set(self, mode: str, status: int = 200) -> None:
        """Change what the destination does; requests left hanging are let go."""
        assert mode in ("down", "answer", "hang", "reset", "untrusted"), mode
        if mode == "down":
            self._close_listener()
        elif self._listener is None:
            self._listen()
        released, self._release = self._release, threading.Event()
        released.set()
        self.mode, self.status = mode, status

    def received(self, reference: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._received if r.get("reference") == reference]

    def close(self) -> None:
        self._release.set()
        self._close_listener()

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        while self._listener is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            args = (conn, self.mode, self.status, self._release)
            threading.Thread(target=self._serve, args=args, daemon=True).start()

    def _serve(self, raw: socket.socket, mode: str, status: int, release: threading.Event) -> None:
        raw.settimeout(10)
        context = self._contexts["untrusted" if mode == "untrusted" else "trusted"]
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        with conn:
            try:
                body = _read_request(conn)
            except (OSError, ValueError):
                return
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = {}
            with self._lock:
                self._received.append(parsed if isinstance(parsed, dict) else {})
            if mode == "hang":
                release.wait(60)
                return
            if mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            answer = json.dumps({"status": "approved" if status < 300 else "error"}).encode()
            head = (
                f"HTTP/1.1 {status} Status\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                conn.sendall(head.encode() + answer)


def _read_request(conn: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 request's body (with a Content-Length, as the vault sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("the connection closed before the request's head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("the connection closed before the request's body")
        body += chunk
    return body


# --- PostgreSQL ---------------------------------------------------------------------------


def _database(stack: Stack) -> str:
    return stack.dsn.rsplit("/", 1)[1]


def postgres_outage(stack: Stack, seconds: float) -> int:
    """End the vault's connections to its database over and over for ``seconds``: the
    first half while it may connect again between two rounds (so that statements are cut
    at every point, commits included), the second half with new connections refused
    too. The backends ended."""
    import asyncpg

    name = _database(stack)
    query = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()"
    )

    async def run() -> int:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        ended = 0
        try:
            end = time.monotonic() + seconds
            refused_from = time.monotonic() + seconds / 2
            refused = False
            try:
                while time.monotonic() < end:
                    if not refused and time.monotonic() >= refused_from:
                        await admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
                        refused = True
                    ended += int(await admin.fetchval(query, name))
                    await asyncio.sleep(0.005)
            finally:
                await admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        finally:
            await admin.close()
        return ended

    return asyncio.run(run())


# --- the key service ----------------------------------------------------------------------


def seal_keyservice(fs: FaultStack) -> None:
    """Seal the key service through its admin API (mutual TLS, the admin identity)."""
    context = client_context(fs.ca_file, client_cert=fs.pki.cert("admin"))
    with httpx.Client(verify=context, trust_env=False, timeout=10) as admin:
        r = admin.post(f"https://localhost:{fs.stack.keyd_port}/v1/seal")
        assert r.status_code == 200, r.text


# --- the scenarios ------------------------------------------------------------------------


@dataclass
class _Run:
    """What a scenario collects while it runs."""

    fs: FaultStack
    ledger: Ledger
    started: float = field(default_factory=time.monotonic)
    restarts: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def back(self, load: Load, since: float, what: str, *, timed: bool = True) -> None:
        """The time from ``since`` to the first 200 (one of the report's "restart to
        first 200" when ``timed``), or a problem."""
        first = load.wait_for_200(since)
        if first is None:
            self.problems.append(f"no 200 within 30 s after {what}")
        elif timed:
            self.restarts.append(first)

    def saw(self, since: float, code: str, within: float, what: str) -> None:
        """A problem unless a 503 ``code`` is answered within ``within`` seconds."""
        if not wait_until(lambda: self.ledger.count(since, status=503, code=code) > 0, within):
            self.problems.append(f"no 503 {code} while {what}")

    def result(
        self, faults: int, *, expect_503: tuple[str, ...] = (), replay_all: bool = False
    ) -> Result:
        sample = None if replay_all or self.fs.replay_all else REPLAY_SAMPLE
        findings = check(
            self.fs.stack, self.ledger, self.fs.ca_file,
            expect_503=expect_503, restarts=self.restarts, replay_sample=sample,
        )  # fmt: skip
        return Result(findings, faults, self.problems, self.notes, time.monotonic() - self.started)


def vault_killed(
    fs: FaultStack, *, kills: int = 10, load_seconds: float = 1.0, workers: int = 8
) -> Result:
    """``kill -9`` of the vault ``kills`` times under load, each after ``load_seconds``
    of it; the vault started again at once, as a supervisor does."""
    run = _Run(fs, fs.ledger("vault-killed"))
    stack = fs.stack
    with Load(stack, run.ledger, fs.ca_file, workers=workers) as load:
        run.back(load, run.started, "the start", timed=False)
        for i in range(kills):
            time.sleep(load_seconds)
            stack.stop("vault", signal.SIGKILL)
            started = time.monotonic()
            stack.start("vault")
            run.back(load, started, f"restart {i + 1}")
    cut = sum(a.status is None and a.sent for a in run.ledger.answers)
    run.notes["requests_cut_by_the_kills"] = cut
    if kills and not cut:
        run.problems.append("no request was in flight at any kill: the kills proved nothing")
    return run.result(kills)


def postgres_terminated(
    fs: FaultStack,
    *,
    outages: int = 3,
    outage_seconds: float = 1.0,
    load_seconds: float = 1.0,
    workers: int = 8,
) -> Result:
    """The vault's PostgreSQL connections ended ``outages`` times under load, each time
    for ``outage_seconds`` (:func:`postgres_outage`)."""
    assert fs.stack.backend == "postgres"
    run = _Run(fs, fs.ledger("postgres-terminated"))
    ended = 0
    with Load(fs.stack, run.ledger, fs.ca_file, workers=workers) as load:
        run.back(load, run.started, "the start", timed=False)
        for i in range(outages):
            time.sleep(load_seconds)
            ended += postgres_outage(fs.stack, outage_seconds)
            run.back(load, time.monotonic(), f"outage {i + 1}")
    run.notes["backends_terminated"] = ended
    if not ended:
        run.problems.append("no backend of the vault was terminated")
    if outages and not run.ledger.count(status=503, code="database_unavailable"):
        run.problems.append("no request was answered 503 database_unavailable")
    # A 200 whose stored answer was lost with its connection leaves the claim held:
    # every acknowledged request is retried, so that those are too.
    return run.result(outages, expect_503=("database_unavailable",), replay_all=True)


def keyservice_down(
    fs: FaultStack,
    *,
    outages: int = 1,
    down_seconds: float = 1.0,
    load_seconds: float = 0.5,
    workers: int = 8,
) -> Result:
    """The key service killed (``kill -9``) and started again, then sealed and started
    again (the development seal unseals at start), ``outages`` times each, under load,
    each down for ``down_seconds``."""
    run = _Run(fs, fs.ledger("keyservice-down"))
    stack, ledger = fs.stack, run.ledger
    with Load(stack, ledger, fs.ca_file, workers=workers) as load:
        run.back(load, run.started, "the start", timed=False)
        for i in range(outages):
            time.sleep(load_seconds)
            stack.stop("keyservice", signal.SIGKILL)
            killed = time.monotonic()
            run.saw(
                killed, "keyservice_unavailable", down_seconds + 10, "the key service was killed"
            )
            time.sleep(max(0.0, killed + down_seconds - time.monotonic()))
            started = time.monotonic()
            stack.start("keyservice")
            run.back(load, started, f"the key service's restart {i + 1}")

            time.sleep(load_seconds)
            seal_keyservice(fs)
            sealed = time.monotonic()
            run.saw(sealed, "keyservice_sealed", down_seconds + 10, "the key service was sealed")
            time.sleep(max(0.0, sealed + down_seconds - time.monotonic()))
            stack.stop("keyservice")
            started = time.monotonic()
            stack.start("keyservice")
            run.back(load, started, f"the key service's unsealing {i + 1}")
    expected = {"keyservice_unavailable": "2", "keyservice_sealed": "30"}
    for a in ledger.answers:
        if a.status == 503 and a.code in expected and a.retry_after != expected[a.code]:
            run.problems.append(f"503 {a.code} with Retry-After {a.retry_after}")
            break
    return run.result(outages * 2, expect_503=tuple(expected))


def audit_full(
    fs: FaultStack,
    kind: str,
    *,
    rounds: int = 1,
    load_seconds: float = 1.0,
    short_seconds: float = 1.5,
    workers: int = 8,
) -> Result:
    """The audit directory full under load (``kind``: ``tmpfs``, its file system filled
    for real; ``enospc``, the injected ENOSPC), ``rounds`` times: when ``short_seconds``,
    first for that long (the vault answers 503 audit_unavailable and carries on once
    there is space), then until the vault gives up and exits 74; started again while
    still full (``enospc``) it must refuse to start with 74 too, and once there is space
    it starts and answers."""
    run = _Run(fs, fs.ledger(f"audit-full-{kind}"))
    stack, ledger = fs.stack, run.ledger
    exits: list[int | None] = []
    with Load(stack, ledger, fs.ca_file, workers=workers) as load:
        run.back(load, run.started, "the start", timed=False)
        for i in range(rounds):
            if short_seconds:
                time.sleep(load_seconds)
                fs.fill_audit(kind)
                filled = time.monotonic()
                run.saw(filled, "audit_unavailable", 10, f"the audit directory was full ({i + 1})")
                time.sleep(max(0.0, filled + short_seconds - time.monotonic()))
                fs.free_audit()
                run.back(load, time.monotonic(), f"space came back ({i + 1})")
                if stack.processes["vault"].poll() is not None:
                    run.problems.append("the vault exited after a short outage of its audit log")
                    stack.start("vault")
            time.sleep(load_seconds)
            fs.fill_audit(kind)
            filled = time.monotonic()
            run.saw(filled, "audit_unavailable", 10, f"the audit directory was full ({i + 1})")
            try:
                exits.append(stack.processes["vault"].wait(AUDIT_FAILURE_GRACE + 20))
            except subprocess.TimeoutExpired:
                exits.append(None)
                stack.stop("vault", signal.SIGKILL)
            if kind == "enospc":
                # Still full: a supervisor's restart must not bring up a vault that
                # answers 503 for ever, nor stop with "configuration error" (exit 2, which
                # supervisors do not restart). (Not on the tmpfs: the log's last page may
                # still hold the few records of a start, so a start may or may not fit.)
                try:
                    stack.start("vault")
                except RuntimeError:
                    exits.append(stack.processes["vault"].returncode)
                else:
                    run.problems.append("the vault started with an audit log it cannot write")
                    exits.append(stack.stop("vault", signal.SIGKILL))
            fs.free_audit()
            started = time.monotonic()
            stack.start("vault")
            run.back(load, started, f"the restart with space again ({i + 1})")
    run.notes["vault_exits"] = exits
    if any(code != AUDIT_FAILED_EXIT for code in exits):
        run.problems.append(f"the vault's exits were {exits}, not {AUDIT_FAILED_EXIT} each")
    return run.result(rounds * (2 if short_seconds else 1), expect_503=("audit_unavailable",))


# --- forwards -------------------------------------------------------------------------------

#: What a forward's destination does (a :class:`Destination` mode and the status it
#: answers), and what the vault must make of it: ``not_sent`` (nothing can have reached
#: it: 502 with Retry-After, the CVC and the key kept, the retry sends it once),
#: ``unknown`` (it may have: 502, replayed on retry and never sent again, the CVC gone)
#: or ``answered`` (the destination's answer is the forward's, replayed on retry).
FORWARD_MODES: dict[str, tuple[str, int, str]] = {
    "refused": ("down", 200, "not_sent"),
    "tls-failure": ("untrusted", 200, "not_sent"),
    "hung": ("hang", 200, "unknown"),
    "reset": ("reset", 200, "unknown"),
    "error-answer": ("answer", 503, "answered"),
}


@dataclass(frozen=True)
class Forwarded:
    """What one ``POST /v1/forwarding/requests`` got (``status`` None: no answer)."""

    status: int | None
    code: str | None = None
    id: str | None = None
    outcome: str | None = None
    #: The destination's status, as the forward reports it.
    upstream: int | None = None
    replayed: bool = False
    retry_after: str | None = None
    error: str | None = None

    def __str__(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        extra = self.code or f"outcome {self.outcome}"
        return f"{self.status} {extra}" + (" (replayed)" if self.replayed else "")


class _Forwards:
    """The forwards of one scenario run, and what they were expected to do."""

    def __init__(self, fs: FaultStack, client: httpx.Client, problems: list[str]) -> None:
        self.fs = fs
        self.client = client
        self.problems = problems
        self.tag = secrets.token_hex(3)
        #: The outcome each card's one forwarding request must be stored with.
        self.outcomes: dict[str, str] = {}

    def expect(self, ok: bool, what: str, got: Forwarded | None = None) -> None:
        if not ok:
            self.problems.append(what + (f" (got {got})" if got is not None else ""))

    def send(self, pm: str, key: str, reference: str, *, slow: bool = False) -> Forwarded:
        """Forward ``pm``'s number, expiry and CVC with ``key``; ``reference`` in the
        body tells the destination's records apart."""
        port = self.fs.destination.port
        body = {
            "amount": 1000,
            "currency": "usd",
            "reference": reference,
            "card": {"number": "", "exp_month": "", "exp_year": "", "cvc": ""},
        }
        data = {
            "payment_method": pm,
            "url": f"https://localhost:{port}/v1/{'slow' if slow else 'authorizations'}",
            "request[body]": json.dumps(body),
            "request[headers][0][name]": "Content-Type",
            "request[headers][0][value]": "application/json",
            "replacements[0]": "card_number",
            "replacements[1]": "card_expiry",
            "replacements[2]": "card_cvc",
        }
        try:
            r = self.client.post(
                f"{self.fs.stack.url}/v1/forwarding/requests",
                data=data,
                headers={"authorization": f"Bearer {self.fs.secret}", "idempotency-key": key},
            )
        except httpx.TransportError as exc:
            return Forwarded(None, error=type(exc).__name__)
        try:
            answer = r.json()
        except ValueError:
            return Forwarded(r.status_code, "(not JSON)")
        replayed = r.headers.get("idempotent-replayed") == "true"
        if r.status_code != 200:
            code = (answer.get("error") or {}).get("code")
            return Forwarded(
                r.status_code, code, replayed=replayed, retry_after=r.headers.get("retry-after")
            )
        upstream = (answer.get("response_details") or {}).get("status")
        return Forwarded(200, None, answer["id"], answer["outcome"], upstream, replayed)

    def mode(self, mode: str, pms: list[str], pool: ThreadPoolExecutor) -> None:
        """``pms`` forwarded at once while the destination does ``mode``, then each
        retried with its key once it answers again (:data:`FORWARD_MODES`)."""
        destination = self.fs.destination
        behaviour, status, kind = FORWARD_MODES[mode]
        keys = {pm: f"fwd-{self.tag}-{mode}-{pm}" for pm in pms}
        refs = {pm: f"ref-{self.tag}-{mode}-{pm}" for pm in pms}
        destination.set(behaviour, status)
        first = dict(
            zip(pms, pool.map(lambda pm: self.send(pm, keys[pm], refs[pm]), pms), strict=True)
        )
        destination.set("answer", 200)
        for pm in pms:
            one, two = first[pm], self.send(pm, keys[pm], refs[pm])
            label = f"{mode}: the forward of {pm}"
            sent = destination.received(refs[pm])
            self.expect(len(sent) == 1, f"{label} reached the destination {len(sent)} times")
            if kind == "not_sent":
                self.expect(
                    (one.status, one.code) == (502, "forwarding_destination_error")
                    and (one.retry_after or "").isdigit(),
                    f"{label}: not 502 forwarding_destination_error with Retry-After",
                    one,
                )
                self.expect(
                    two.outcome == "completed" and not two.replayed,
                    f"{label}: its retry with the same key was not sent afresh",
                    two,
                )
                self.expect(
                    bool(sent) and (sent[-1].get("card") or {}).get("cvc") == CVC,
                    f"{label}: the CVC was consumed by an attempt that could not have sent it",
                )
                self.outcomes[pm] = "completed"
            elif kind == "unknown":
                self.expect(
                    (one.status, one.code) == (502, "forwarding_destination_error"),
                    f"{label}: not 502 forwarding_destination_error",
                    one,
                )
                self.expect(
                    (two.status, two.code, two.replayed)
                    == (502, "forwarding_destination_error", True),
                    f"{label}: its retry with the same key was not the first answer replayed",
                    two,
                )
                self.cvc_gone(pm, keys[pm], refs[pm], label)
                self.outcomes[pm] = "unknown"
            else:
                self.expect(
                    (one.outcome, one.upstream) == ("completed", status),
                    f"{label}: the destination's {status} was not answered as its answer",
                    one,
                )
                self.expect(
                    two.status == 200 and two.id == one.id and two.replayed,
                    f"{label}: its retry with the same key was not replayed",
                    two,
                )
                self.outcomes[pm] = "completed"

    def cvc_gone(self, pm: str, key: str, ref: str, label: str) -> None:
        """A new forward asking for the CVC of a forward that may have left: refused,
        and nothing sent."""
        fresh = self.send(pm, f"{key}-new", f"{ref}-new")
        self.expect(
            (fresh.status, fresh.code) == (400, "parameter_invalid")
            and not self.fs.destination.received(f"{ref}-new"),
            f"{label}: a new forward of a CVC that may have left was not refused",
            fresh,
        )

    def killed(self, pm: str, pool: ThreadPoolExecutor) -> float:
        """The vault killed while the destination holds the forward of ``pm``; the
        seconds its restart took."""
        fs, destination = self.fs, self.fs.destination
        key, ref = f"fwd-{self.tag}-killed", f"ref-{self.tag}-killed"
        label = f"killed: the forward of {pm}"
        destination.set("hang")
        cut = pool.submit(self.send, pm, key, ref, slow=True)
        self.expect(
            wait_until(lambda: bool(destination.received(ref)), 15),
            f"{label} never reached the destination",
        )
        fs.stack.stop("vault", signal.SIGKILL)
        destination.set("answer", 200)
        answer = cut.result(30)
        self.expect(answer.status is None, f"{label} was answered by a dead vault", answer)
        started = time.monotonic()
        fs.stack.start("vault")
        restart = time.monotonic() - started
        r = self.client.get(
            f"{fs.stack.url}/v1/forwarding/requests",
            params={"limit": "100"},
            headers={"authorization": f"Bearer {fs.secret}"},
        )
        listed = [f["outcome"] for f in r.json()["data"] if f["payment_method"] == pm]
        self.expect(
            listed == ["unknown"],
            f"{label}: after the restart it reads {listed}, not ['unknown'] (nothing settled "
            "what the dead process left)",
        )
        retry = self.send(pm, key, ref, slow=True)
        self.expect(
            (retry.outcome, retry.replayed) == ("unknown", True),
            f"{label}: its retry with the same key did not report it unknown",
            retry,
        )
        sent = len(destination.received(ref))
        self.expect(sent == 1, f"{label} reached the destination {sent} times")
        self.cvc_gone(pm, key, ref, label)
        self.outcomes[pm] = "unknown"
        return restart

    def stored(self, ledger: Ledger) -> int:
        """Every forwarding request of these cards audited before it left, none left
        pending, one per card with the outcome expected; how many there are."""
        rows = self.fs.stack.sql(
            "SELECT id, payment_method, outcome FROM forwarding_requests WHERE account_id = ?",
            ledger.account,
        )
        mine = [(str(i), str(p), str(o)) for i, p, o in rows if str(p) in self.outcomes]
        requested = {
            r.get("detail", {}).get("forwarding_request")
            for r in audit_records(self.fs.stack)
            if r.get("action") == "forward.requested"
        }
        unaudited = [i for i, _, _ in mine if i not in requested]
        self.expect(not unaudited, f"forwarding requests without forward.requested: {unaudited}")
        for pm, outcome in self.outcomes.items():
            stored = [o for _, p, o in mine if p == pm]
            self.expect(stored == [outcome], f"{pm}: stored outcomes {stored}, not [{outcome!r}]")
        return len(mine)


def _cards(fs: FaultStack, ledger: Ledger, count: int) -> list[str]:
    """``count`` cards with a CVC, made as the load makes them (so the common check
    covers them too)."""
    pms: list[str] = []
    with https_client(fs.ca_file) as client:
        while len(pms) < count:
            logical = ledger.new()
            answer = tokenize(client, fs.stack.url, fs.secret, logical)
            ledger.record(logical, answer)
            if answer.status == 200 and answer.pm_id:
                pms.append(answer.pm_id)
    return pms


def forwards(fs: FaultStack, *, per_mode: int = 3) -> Result:
    """Forwards of cards with a CVC while the destination is each of
    :data:`FORWARD_MODES` (``per_mode`` at once, each with its own Idempotency-Key and
    card), each retried with its key once the destination answers again; then one
    forward whose vault is killed while the destination holds it: once the vault is
    back, before any retry, it reads ``unknown`` (start-up settles what the dead
    process left), its retry replays that without sending, and its CVC is gone. Each
    forward is checked against what the destination actually received; every
    forwarding request must have its ``forward.requested`` record and none may be left
    ``pending``."""
    run = _Run(fs, fs.ledger("forwards", cvc=CVC))
    pms = _cards(fs, run.ledger, per_mode * len(FORWARD_MODES) + 1)
    with (
        https_client(fs.ca_file, timeout=60) as client,
        ThreadPoolExecutor(per_mode) as pool,
    ):
        checks = _Forwards(fs, client, run.problems)
        for i, mode in enumerate(FORWARD_MODES):
            checks.mode(mode, pms[i * per_mode : (i + 1) * per_mode], pool)
        run.notes["restart_s"] = round(checks.killed(pms[-1], pool), 3)
    run.notes["forwards"] = checks.stored(run.ledger)
    return run.result(len(FORWARD_MODES) + 1)
