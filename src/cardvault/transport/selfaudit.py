"""A service's audit of its own TLS, on a schedule (``[tls_audit]``), into its audit log.

The vault and the key service each run :func:`self_audit_loop` beside their listeners.
Every ``interval`` seconds (a day by default; the first run ``first_delay`` seconds after
the start) each of the service's TLS listeners is checked:

* its certificate file: the key's size, the days left (under ``warn_days``: a warning in
  the log and in the record), and, when the listener has a CA to chain to, that the CA
  issued it. This needs nothing but the file, so it always runs;
* the listener itself, from outside, by ``cardvault doctor tls``'s audit
  (:mod:`cardvault.transport.tlsaudit`, sslyze): the protocols and suites against the
  Mozilla profile, the certificate served, HSTS. When no sslyze program is found the
  record says the scan was skipped and why.

One audit record per run, ``tls.audit``: whether every listener is compliant and, if
not, the problems found (never more than a bounded text). A failure of the audit itself
is logged and retried at the next interval; it never stops the service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cardvault.logging import get_logger
from cardvault.transport.certs import RENEW_WITHIN_DAYS
from cardvault.transport.tlsaudit import Endpoint, SslyzeMissing, audit, find_sslyze

__all__ = ["OwnListener", "TlsAuditSettings", "certificate_problems", "run_self_audit"]

_log = get_logger("cardvault.tls_audit")
#: The most text of problems one audit record holds.
_MAX_PROBLEMS = 2000
_MIN_BITS = {"RSA": 2048, "EC": 256}


@dataclasses.dataclass
class TlsAuditSettings:
    """``[tls_audit]``: the service's audit of its own TLS."""

    #: Seconds between audits; 0 turns them off.
    interval: float = 86_400.0
    #: Seconds after the start before the first audit.
    first_delay: float = 600.0
    #: The CAs (PEM) the public listener's certificate must chain to; default: the
    #: public trust stores (a public listener serves browsers). Listeners of mutual TLS
    #: chain to their own client CA file.
    ca_file: Path | None = None
    #: Report certificates with fewer days left than this.
    warn_days: int = RENEW_WITHIN_DAYS
    #: The sslyze program (default: CARDVAULT_SSLYZE, .venv-tools, or sslyze on PATH).
    sslyze: str | None = None
    #: A client certificate and key to present where the listener asks for one (mutual
    #: TLS); without them such a listener's scan is skipped (its file is still checked).
    client_cert_file: Path | None = None
    client_key_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class OwnListener:
    """One of the service's listeners: its name, the address it listens on, its
    certificate file, the CA its certificate must chain to (None: not checked here) and
    whether it asks for a client certificate."""

    name: str
    host: str
    port: int
    cert_file: Path
    ca_file: Path | None = None
    mutual: bool = False


def certificate_problems(
    cert_file: Path, ca_file: Path | None, warn_days: int, now: dt.datetime | None = None
) -> tuple[dict[str, Any], list[str]]:
    """What the certificate file says: ``(facts, problems)``."""
    now = now or dt.datetime.now(dt.UTC)
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = cert.public_key()
    kind = type(key).__name__
    bits = int(getattr(key, "key_size", 0))
    family = "RSA" if "RSA" in kind else "EC" if kind.startswith(("EC", "Elliptic")) else kind
    left = (cert.not_valid_after_utc - now).total_seconds() / 86_400
    facts = {"key": f"{family}-{bits}", "days_left": int(left // 1), "file": str(cert_file)}
    problems = []
    if family in _MIN_BITS and bits < _MIN_BITS[family]:
        problems.append(f"{family}-{bits} key: below {_MIN_BITS[family]} bits")
    if left < 0:
        problems.append(f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif left < warn_days:
        problems.append(f"certificate expires in {int(left)} days (under {warn_days}): renew it")
    if ca_file is not None:
        try:
            ca = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ValueError):
            problems.append(f"the CA file {ca_file} cannot be read")
        else:
            if not any(_issued_by(cert, c) for c in ca):
                problems.append("certificate not issued by the configured CA")
    return facts, problems


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _endpoint(own: OwnListener, settings: TlsAuditSettings) -> Endpoint:
    """How to reach ``own`` from this host: its address (a wildcard bind by loopback),
    under the first name its certificate serves (so that the name check is the real
    one)."""
    cert = x509.load_pem_x509_certificate(own.cert_file.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*sans.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    ip = "127.0.0.1" if own.host in ("0.0.0.0", "", "::") else own.host  # noqa: S104
    client = (
        (settings.client_cert_file, settings.client_key_file)
        if own.mutual and settings.client_cert_file and settings.client_key_file
        else None
    )
    return Endpoint(
        own.name, names[0] if names else ip, own.port, ca_file=own.ca_file,
        client_cert=client, ip=ip,
    )  # fmt: skip


async def run_self_audit(
    service: str,
    listeners: Sequence[OwnListener],
    settings: TlsAuditSettings,
    record: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    profile: str = "intermediate",
) -> dict[str, Any]:
    """One audit of ``listeners``: the detail written by ``record`` (the audit record's
    ``detail``), also returned."""
    problems: list[str] = []
    for own in listeners:
        facts, found = certificate_problems(own.cert_file, own.ca_file, settings.warn_days)
        if any("expire" in p for p in found):
            _log.warning(
                "TLS certificate expires soon", service=service, listener=own.name, **facts
            )
        problems += [f"{own.name}: {p}" for p in found]
    scanned = "skipped"
    try:
        program = find_sslyze(settings.sslyze)
    except SslyzeMissing as exc:
        scanned = f"skipped: {exc}"
    else:
        endpoints = [
            _endpoint(own, settings)
            for own in listeners
            if not own.mutual or settings.client_cert_file is not None
        ]
        reports = await asyncio.to_thread(
            audit, endpoints, profile=profile, sslyze=program, warn_days=settings.warn_days
        )
        scanned = f"{len(reports)} listener(s) scanned"
        for report in reports:
            problems += [
                f"{report.endpoint.name}: {p}" for p in report.problems if "expire" not in p
            ]
    text = "; ".join(dict.fromkeys(problems))
    detail = {
        "compliant": "yes" if not problems else "no",
        "listeners": len(listeners),
        "scan": scanned[:300],
        "problems": text[:_MAX_PROBLEMS],
    }
    if problems:
        _log.warning("TLS audit: drift", service=service, problems=text[:_MAX_PROBLEMS])
    await record(detail)
    return detail


async def self_audit_loop(
    service: str,
    listeners: Sequence[OwnListener],
    settings: TlsAuditSettings,
    record: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    profile: str = "intermediate",
) -> None:
    """:func:`run_self_audit` every ``settings.interval`` seconds until cancelled."""
    if settings.interval <= 0:
        return
    await asyncio.sleep(settings.first_delay)
    while True:
        try:
            await run_self_audit(service, listeners, settings, record, profile=profile)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.error("TLS audit failed; trying again at the next interval", error=repr(exc))
        await asyncio.sleep(settings.interval)
