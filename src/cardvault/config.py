"""Typed settings, read from a TOML file and then from the environment.

Settings are plain dataclasses. A file looks like::

    profile = "production"

    [server]
    port = 8443
    cert_file = "/etc/cardvault/vault.pem"

and every field can be overridden from the environment as ``CARDVAULT_<SECTION>_<FIELD>``
(``CARDVAULT_SERVER_PORT=9443``), or ``CARDVAULT_<FIELD>`` for top-level fields
(``CARDVAULT_PROFILE=development``). A field of type :class:`Secret` can also be read from
a file named by ``<field>_file`` in TOML or ``CARDVAULT_<SECTION>_<FIELD>_FILE`` in the
environment, which is how secrets should arrive: never in source, never in argv.

A missing required value stops start-up with a :class:`ConfigurationError` naming the
setting and where it could be given. Messages name settings, never their values.

The ``production`` profile is the default. ``development`` must be asked for, and the
services announce it loudly at start-up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from cardvault.errors import ConfigurationError

__all__ = [
    "ENV_PREFIX",
    "MISSING",
    "AuditSettings",
    "ListenerSettings",
    "LoggingSettings",
    "Profile",
    "Secret",
    "SecurityTxtSettings",
    "ServerLimits",
    "load_settings",
]

ENV_PREFIX = "CARDVAULT_"

Profile = Literal["production", "development"]
TlsProfile = Literal["intermediate", "modern"]


class Secret:
    """A secret string that never shows itself in a repr, str or f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself. Call at the point of use only."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return hash(type(self))

    def __reduce__(self) -> Any:
        raise TypeError("Secret values are not picklable")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Marks a required field: ``port: int = MISSING`` is refused by type checkers, so
#: required fields use ``field(default=MISSING)`` through :func:`required`.
MISSING: Any = _Missing()


def required() -> Any:
    """A dataclass field that must be given in the file or the environment."""
    return dataclasses.field(default=MISSING)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one connection and one request may take on a listener, enforced by the
    shared transport (:mod:`cardvault.transport.server`) before any application sees
    the request. ``[server.limits]`` in TOML, ``CARDVAULT_SERVER_LIMITS_<FIELD>`` in the
    environment. docs/transport.md ("Limits") gives each one's answer and reasons."""

    #: Bytes of one request head (request line and header fields): 431 beyond.
    max_head_bytes: int = 16 * 1024
    #: Header fields in one request: 431 beyond.
    max_headers: int = 100
    #: Bytes of the request target (the URL in the request line): 414 beyond.
    max_url_bytes: int = 8 * 1024
    #: Bytes of one request body, declared (Content-Length) or received: 413 beyond. A
    #: backstop: the vault's routes refuse far smaller bodies themselves.
    max_body_bytes: int = 1024 * 1024
    #: Seconds a new connection may stay silent before its first request begins (closed).
    first_byte_timeout: float = 10.0
    #: Seconds from a request's first byte to the end of its head: 408 beyond.
    head_timeout: float = 10.0
    #: Seconds from a request's first byte to the end of its body: 408 beyond.
    request_timeout: float = 30.0
    #: Seconds an idle keep-alive connection is kept open between requests (closed).
    keep_alive_timeout: float = 5.0
    #: Seconds a TLS handshake may take (the connection is dropped beyond).
    tls_handshake_timeout: float = 10.0
    #: Seconds a closing connection may take to say goodbye: the TLS close_notify
    #: exchange, or on plain HTTP the draining of what the client still sends after a
    #: refusal, so that the answer is not lost to a TCP reset. Then it is dropped.
    close_timeout: float = 3.0
    #: Open connections per listener (per process): 503 with Retry-After beyond.
    max_connections: int = 1024
    #: Open connections per client address on a listener: 503 with Retry-After beyond.
    #: 0 = no per-client cap (behind a load balancer every client has its address).
    max_connections_per_client: int = 128

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name == "max_connections_per_client" else 1
            if field.type == "float":
                if not 0 < value < float("inf"):
                    raise ConfigurationError(
                        f"setting server.limits.{field.name} must be a number of seconds above 0"
                    )
            elif value < least:
                raise ConfigurationError(
                    f"setting server.limits.{field.name} must be at least {least}"
                )


@dataclasses.dataclass
class ListenerSettings:
    """One TLS listener (HTTPS only; an optional plain port that only redirects)."""

    host: str = "127.0.0.1"
    port: int = 8443
    cert_file: Path = required()
    key_file: Path = required()
    #: Mozilla server-side TLS profile: "intermediate" (TLS 1.2 + 1.3) or "modern" (1.3).
    tls_profile: TlsProfile = "intermediate"
    #: When set, the listener requires a client certificate issued by this CA (mTLS).
    client_ca_file: Path | None = None
    #: A plain-HTTP port that answers every request with a redirect to HTTPS; 0 = off.
    redirect_port: int = 0
    #: The public HTTPS port the redirect points at (defaults to ``port``); set it when
    #: a load balancer publishes the service on 443.
    public_port: int = 0
    #: Connection and request limits of this service's listeners ([server.limits]).
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)


@dataclasses.dataclass
class SecurityTxtSettings:
    """RFC 9116 security.txt, served at /.well-known/security.txt on every listener."""

    contact: list[str] = dataclasses.field(
        default_factory=lambda: ["mailto:security@cardvault.invalid"]
    )
    policy: str = "https://cardvault.invalid/security-policy"
    preferred_languages: str = "en"
    #: Absolute https URLs where this file is published; defaults to the listener's own.
    canonical: list[str] = dataclasses.field(default_factory=list)
    #: RFC 9116 asks for an expiry less than a year ahead. When unset the file expires
    #: ``expires_days`` after the service started, so a running service never serves a
    #: stale file; operators who prefer a fixed date set ``expires``.
    expires: dt.datetime | None = None
    expires_days: int = 180
    encryption: str | None = None
    acknowledgments: str | None = None


@dataclasses.dataclass
class LoggingSettings:
    level: str = "info"
    #: "json", "console", or "auto" (JSON in production, console in development).
    format: Literal["auto", "json", "console"] = "auto"


@dataclasses.dataclass
class AuditSettings:
    """A service's audit log (see docs/audit.md)."""

    #: Where the audit log lives (audit.jsonl, audit.pub, audit.head, audit.key).
    #: Defaults to the SQLite store's directory; required with PostgreSQL.
    directory: Path | None = None
    #: Where command-line administration (accounts, API keys) is recorded, since the
    #: running service holds its own log. Defaults to "<directory>-admin".
    admin_directory: Path | None = None
    #: Sign the chain head every this many records, and at least this often (seconds).
    checkpoint_every: int = 1000
    checkpoint_interval: int = 60

    def resolved(self, store_url: str) -> tuple[Path, Path]:
        """``(directory, admin_directory)``; ConfigurationError when they cannot be known."""
        directory = self.directory
        if directory is None:
            if not store_url.startswith("sqlite:///"):
                raise ConfigurationError(
                    "missing required setting audit.directory (needed when the store is not SQLite)"
                )
            directory = Path(store_url.removeprefix("sqlite://")).parent
        admin = self.admin_directory or directory.with_name(directory.name + "-admin")
        return directory, admin


S = TypeVar("S")


def load_settings(
    cls: type[S],
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Build ``cls`` from the TOML file at ``path``, then the environment, then
    ``overrides`` (a nested mapping, as from command-line options).

    Raises :class:`ConfigurationError` naming the first missing or invalid setting.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigurationError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"configuration file {path} is not valid TOML: {exc}") from exc
    merged = _merge(data, dict(overrides or {}))
    return _build(cls, merged, env if env is not None else os.environ, prefix="", base=path)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is not None:
            out[k] = v
    return out


def _build(
    cls: type[S], data: Mapping[str, Any], env: Mapping[str, str], *, prefix: str, base: Path | None
) -> S:
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"setting {prefix.rstrip('.') or 'root'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = set(fields) | {f"{name}_file" for name in fields}
    for key in data:
        if key not in known:
            raise ConfigurationError(f"unknown setting {prefix}{key}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}{name}"
        env_name = ENV_PREFIX + dotted.replace(".", "_").upper()
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(
                typing.cast(type[Any], hint),
                data.get(name, {}),
                env,
                prefix=f"{dotted}.",
                base=base,
            )
            continue
        raw: Any = MISSING
        if name in data:
            raw = data[name]
        if f"{name}_file" in data:
            raw = _read_secret_file(Path(data[f"{name}_file"]), dotted)
        if env_name in env:
            raw = env[env_name]
        if f"{env_name}_FILE" in env:
            raw = _read_secret_file(Path(env[f"{env_name}_FILE"]), dotted)
        if raw is MISSING:
            if field.default is MISSING:
                raise ConfigurationError(
                    f"missing required setting {dotted}: set it in the configuration file "
                    f"or in the environment as {env_name}"
                )
            continue
        kwargs[name] = _coerce(raw, hint, dotted)
    return cls(**kwargs)


def _read_secret_file(path: Path, dotted: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the file for setting {dotted}") from exc


def _coerce(raw: Any, hint: Any, dotted: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _coerce(raw, non_none[0], dotted)
    if origin is Literal:
        if raw not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigurationError(f"setting {dotted} must be one of {allowed}")
        return raw
    if origin is list:
        (item,) = args
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list):
            raise ConfigurationError(f"setting {dotted} must be a list")
        return [_coerce(v, item, dotted) for v in raw]
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if hint is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if hint is str:
            if not isinstance(raw, str | int | float):
                raise ValueError
            return str(raw)
        if hint is Path:
            return Path(raw).expanduser()
        if hint is Secret:
            return raw if isinstance(raw, Secret) else Secret(str(raw))
        if hint is dt.datetime:
            value = raw if isinstance(raw, dt.datetime) else dt.datetime.fromisoformat(str(raw))
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"setting {dotted} must be of type {getattr(hint, '__name__', hint)}"
        ) from exc
    raise ConfigurationError(f"setting {dotted} has an unsupported type")  # pragma: no cover
