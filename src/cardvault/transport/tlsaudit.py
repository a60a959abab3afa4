"""The TLS audit of a deployment's listeners and destinations (``cardvault doctor tls``).

Stripe audits "the certificates we serve, the certificate authorities we use, and the
ciphers we support"; this is that audit for a cardvault deployment, on the running
listeners, not on their settings. The handshakes are sslyze's (a well-kept TLS scanner,
already the tests' reference): it runs in its own virtual environment (it pins other
versions of ``cryptography`` than cardvault does), so it is called as a program and its
JSON read. On top of sslyze's check against the Mozilla profile, each endpoint is held
to the deployment's own rules:

* protocols: nothing older than TLS 1.2 (TLS 1.3 only with the ``modern`` profile);
* the certificate: a key of at least 2048 bits (RSA) or 256 (EC), valid now and for at
  least ``warn_days`` more days, naming the host it was reached at, and chaining to one
  of the deployment's accepted CAs (``ca_files``; for an endpoint with no CA file of its
  own, the public trust stores sslyze carries);
* HSTS, on the deployment's own listeners, with a max-age of at least a year;
* OCSP stapling is reported where the certificate names a responder (a private CA's
  certificates name none).

Every problem is a sentence naming what was found; an endpoint with none is compliant.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cardvault.transport.certs import RENEW_WITHIN_DAYS

__all__ = [
    "HSTS_MIN_AGE",
    "WARN_DAYS",
    "Endpoint",
    "Report",
    "SslyzeMissing",
    "audit",
    "find_sslyze",
]

#: A certificate with fewer days left than this is reported (``cardvault up`` renews its
#: own below it, and so does ``cardvault certs renew``).
WARN_DAYS = RENEW_WITHIN_DAYS
#: One year: the least max-age HSTS preload lists accept.
HSTS_MIN_AGE = 31_536_000
_MIN_KEY_BITS = {"RSAPublicKey": 2048, "EllipticCurvePublicKey": 256, "ECPublicKey": 256}
_OLD_PROTOCOLS = {
    "ssl_2_0_cipher_suites": "SSL 2.0",
    "ssl_3_0_cipher_suites": "SSL 3.0",
    "tls_1_0_cipher_suites": "TLS 1.0",
    "tls_1_1_cipher_suites": "TLS 1.1",
}
_PROTOCOLS = {
    **_OLD_PROTOCOLS,
    "tls_1_2_cipher_suites": "TLS 1.2",
    "tls_1_3_cipher_suites": "TLS 1.3",
}
_SUPPLIED = "Supplied CA file"
_TIMEOUT = 300


class SslyzeMissing(Exception):
    """No sslyze program to run."""


@dataclass(frozen=True)
class Endpoint:
    """One TLS endpoint to audit: ``name`` for people, ``host`` and ``port`` to reach,
    the CA file its certificate must chain to (None: the public trust stores), whether
    it is one of the deployment's own listeners (HSTS required) and the client
    certificate to present if it asks for one (mutual TLS)."""

    name: str
    host: str
    port: int
    ca_file: Path | None = None
    own: bool = True
    client_cert: tuple[Path, Path] | None = None
    #: The address to connect to, when it is not what ``host`` resolves to (a service
    #: auditing itself connects to its own address under its certificate's name).
    ip: str | None = None

    @classmethod
    def from_url(cls, name: str, url: str, **kwargs: Any) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{name}: not an https:// URL")
        return cls(name, parts.hostname, parts.port or 443, **kwargs)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def target(self) -> str:
        """sslyze's form: ``host:port``, or ``host:port{ip}`` to connect to ``ip``."""
        return self.address + (f"{{{self.ip}}}" if self.ip else "")


@dataclass
class Report:
    """What the audit found at one endpoint (``problems`` empty: compliant)."""

    endpoint: Endpoint
    problems: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    cipher_suites: list[str] = field(default_factory=list)
    certificate: dict[str, Any] = field(default_factory=dict)
    hsts: dict[str, Any] | None = None
    ocsp: str = "not checked"

    @property
    def compliant(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        endpoint = dataclasses.asdict(self.endpoint)
        endpoint["ca_file"] = str(self.endpoint.ca_file) if self.endpoint.ca_file else None
        endpoint.pop("client_cert")
        return {
            "endpoint": endpoint,
            "compliant": self.compliant,
            "problems": self.problems,
            "protocols": self.protocols,
            "cipher_suites": self.cipher_suites,
            "certificate": self.certificate,
            "hsts": self.hsts,
            "ocsp": self.ocsp,
        }


def find_sslyze(given: str | None = None) -> str:
    """The sslyze program: ``given``, else ``CARDVAULT_SSLYZE``, else ``.venv-tools`` of
    this checkout (where ``scripts/bootstrap`` installs it), else ``sslyze`` on PATH."""
    here = Path(__file__).resolve().parents[3] / ".venv-tools" / "bin" / "sslyze"
    for candidate in (given, os.environ.get("CARDVAULT_SSLYZE"), str(here)):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("sslyze")
    if found:
        return found
    raise SslyzeMissing(
        "sslyze not found: run scripts/bootstrap (it installs sslyze 6.3.1 into "
        ".venv-tools), or give --sslyze / CARDVAULT_SSLYZE"
    )


def audit(
    endpoints: Sequence[Endpoint],
    *,
    profile: str = "intermediate",
    sslyze: str | None = None,
    warn_days: int = WARN_DAYS,
    now: dt.datetime | None = None,
) -> list[Report]:
    """Scan every endpoint and report on each, in the order given. Endpoints that share
    a CA file and a client certificate are scanned by one sslyze run."""
    program = find_sslyze(sslyze)
    moment = now or dt.datetime.now(dt.UTC)
    reports = {e: Report(e) for e in endpoints}
    groups: dict[tuple[Path | None, tuple[Path, Path] | None], list[Endpoint]] = {}
    for endpoint in endpoints:
        groups.setdefault((endpoint.ca_file, endpoint.client_cert), []).append(endpoint)
    for (ca_file, client_cert), members in groups.items():
        results, compliance = _scan(program, members, profile, ca_file, client_cert)
        for endpoint in members:
            report = reports[endpoint]
            found = results.get(endpoint.address)
            if found is None:
                report.problems.append("not scanned: sslyze gave no result for it")
                continue
            _judge(report, found, profile, warn_days, moment)
            report.problems.extend(
                f"Mozilla {profile}: {reason}" for reason in compliance.get(endpoint.address, [])
            )
    return [reports[e] for e in endpoints]


def _scan(
    program: str,
    endpoints: Sequence[Endpoint],
    profile: str,
    ca_file: Path | None,
    client_cert: tuple[Path, Path] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """One sslyze run: each endpoint's result (by ``host:port``) and the reasons it
    fails the Mozilla profile (sslyze prints them; absent: compliant)."""
    with tempfile.TemporaryDirectory(prefix="cardvault-tlsaudit-") as tmp:
        out = Path(tmp) / "scan.json"
        command = [program, f"--mozilla_config={profile}", "--certinfo", "--http_headers"]
        if ca_file is not None:
            command.append(f"--certinfo_ca_file={ca_file}")
        if client_cert is not None:
            command += ["--cert", str(client_cert[0]), "--key", str(client_cert[1])]
        command += [f"--json_out={out}", *(e.target for e in endpoints)]
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
        if not out.exists():
            raise RuntimeError(f"sslyze failed (exit {proc.returncode}): {proc.stderr[-500:]}")
        document = json.loads(out.read_text())
    results: dict[str, dict[str, Any]] = {}
    for item in document.get("server_scan_results", []):
        location = item["server_location"]
        results[f"{location['hostname']}:{location['port']}"] = item
    return results, _compliance(proc.stdout)


_VERDICT = re.compile(r"^\s*(\S+:\d+): (OK - Compliant|FAILED - Not compliant|ERROR.*)\.?\s*$")
_REASON = re.compile(r"^\s*\* (.+)$")


def _compliance(stdout: str) -> dict[str, list[str]]:
    """The reasons sslyze gives, per ``host:port``, for failing the Mozilla profile."""
    reasons: dict[str, list[str]] = {}
    current: str | None = None
    section = stdout.split("COMPLIANCE AGAINST", 1)
    for line in section[1].splitlines() if len(section) == 2 else []:
        verdict = _VERDICT.match(line)
        if verdict:
            current = verdict.group(1)
            if not verdict.group(2).startswith("OK"):
                reasons.setdefault(current, [])
                if verdict.group(2).startswith("ERROR"):
                    reasons[current].append(verdict.group(2))
            continue
        reason = _REASON.match(line)
        if reason and current is not None:
            reasons.setdefault(current, []).append(reason.group(1).strip())
    return reasons


def _judge(
    report: Report, found: dict[str, Any], profile: str, warn_days: int, now: dt.datetime
) -> None:
    """The deployment's own rules, on one endpoint's sslyze result."""
    if found.get("connectivity_status") != "COMPLETED":
        trace = str(found.get("connectivity_error_trace") or "").strip().splitlines()
        report.problems.append(f"unreachable: {trace[-1] if trace else 'no TLS connection'}")
        return
    scan = found["scan_result"]
    for key, label in _PROTOCOLS.items():
        suites = _accepted(scan.get(key))
        if suites:
            report.protocols.append(label)
            report.cipher_suites.extend(suites)
            if key in _OLD_PROTOCOLS:
                report.problems.append(f"accepts {label}")
    if profile == "modern" and "TLS 1.2" in report.protocols:
        report.problems.append("accepts TLS 1.2 (the modern profile is TLS 1.3 only)")
    _judge_certificate(report, scan.get("certificate_info"), warn_days, now)
    headers = (scan.get("http_headers") or {}).get("result") or {}
    hsts = headers.get("strict_transport_security_header")
    report.hsts = hsts
    if report.endpoint.own:
        if hsts is None:
            report.problems.append("no Strict-Transport-Security header")
        elif int(hsts.get("max_age") or 0) < HSTS_MIN_AGE:
            report.problems.append(
                f"HSTS max-age {hsts.get('max_age')} is under a year ({HSTS_MIN_AGE})"
            )


def _accepted(attempt: dict[str, Any] | None) -> list[str]:
    if not attempt or attempt.get("status") != "COMPLETED":
        return []
    result = attempt.get("result") or {}
    return [s["cipher_suite"]["name"] for s in result.get("accepted_cipher_suites", [])]


def _judge_certificate(
    report: Report, info: dict[str, Any] | None, warn_days: int, now: dt.datetime
) -> None:
    result = (info or {}).get("result")
    if not result or not result.get("certificate_deployments"):
        report.problems.append("no certificate information (the certificate scan failed)")
        return
    deployment = result["certificate_deployments"][0]
    chain = deployment["received_certificate_chain"]
    leaf = chain[0]
    key = leaf.get("public_key") or {}
    algorithm = str(key.get("algorithm"))
    bits = int(key.get("key_size") or 0)
    not_after = _when(leaf["not_valid_after"])
    not_before = _when(leaf["not_valid_before"])
    days_left = (not_after - now).total_seconds() / 86400
    sans = leaf.get("subject_alternative_name") or {}
    names = [*sans.get("dns_names", []), *sans.get("ip_addresses", [])]
    trusted = [
        p["trust_store"]["name"]
        for p in deployment.get("path_validation_results", [])
        if p.get("was_validation_successful")
    ]
    accepted = _SUPPLIED in trusted if report.endpoint.ca_file is not None else bool(trusted)
    report.certificate = {
        "subject": leaf["subject"]["rfc4514_string"],
        "issuer": leaf["issuer"]["rfc4514_string"],
        "key": f"{_key_name(algorithm)}-{bits}"
        + (f" ({key['ec_curve_name']})" if key.get("ec_curve_name") else ""),
        "names": names,
        "not_after": leaf["not_valid_after"],
        "days_left": int(days_left // 1),
        "chain_length": len(chain),
        "accepted_ca": accepted,
        "trusted_by": trusted,
    }
    minimum = _MIN_KEY_BITS.get(algorithm)
    if minimum is not None and bits < minimum:
        report.problems.append(f"{_key_name(algorithm)}-{bits} key: below {minimum} bits")
    if days_left < 0:
        report.problems.append(f"certificate expired on {leaf['not_valid_after']}")
    elif days_left < warn_days:
        report.problems.append(
            f"certificate expires in {int(days_left)} days (under {warn_days}): renew it"
        )
    if not_before > now:
        report.problems.append(f"certificate not valid before {leaf['not_valid_before']}")
    if not accepted:
        report.problems.append(
            f"certificate does not chain to an accepted CA (issuer {leaf['issuer']['rfc4514_string']})"
        )
    if not _names_host(names, report.endpoint.host):
        report.problems.append(f"certificate does not name {report.endpoint.host}")
    if deployment.get("ocsp_response"):
        report.ocsp = "stapled"
    elif _names_ocsp_responder(leaf):
        report.ocsp = "not stapled"
    else:
        report.ocsp = "not applicable: the certificate names no OCSP responder"


def _names_ocsp_responder(leaf: dict[str, Any]) -> bool:
    """Whether the leaf certificate names an OCSP responder (its AIA extension)."""
    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID

    cert = x509.load_pem_x509_certificate(leaf["as_pem"].encode("ascii"))
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return False
    return any(d.access_method == AuthorityInformationAccessOID.OCSP for d in aia.value)


def _key_name(algorithm: str) -> str:
    return {"RSAPublicKey": "RSA", "EllipticCurvePublicKey": "EC", "ECPublicKey": "EC"}.get(
        algorithm, algorithm
    )


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _names_host(names: Iterable[str], host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for name in names:
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                continue
        elif name.lower() == host.lower() or (
            name.startswith("*.")
            and "." in host
            and host.split(".", 1)[1].lower() == name[2:].lower()
        ):
            return True
    return False
