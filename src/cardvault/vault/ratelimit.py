"""Per-key rate limits: a token bucket per API key, in this process or in Redis.

Publishable keys get a much smaller bucket: they sit in web pages, and card testers use
them to try stolen numbers.

``[limits] backend`` chooses where the buckets live (docs/api.md, "Rate limits"):

* ``"memory"`` (the default): in this process (:class:`RateLimiter`). Right for one
  process; with N processes a key gets N times its rate.
* ``"redis"``: in Redis, shared by every vault process that uses it
  (:class:`RedisBuckets`). One Lua script refills and takes a token atomically, on the
  Redis server's clock (``TIME``), so that processes on hosts whose clocks disagree
  still share one bucket. A bucket's key expires when the bucket would be full again,
  so idle keys vanish by themselves.

When Redis does not answer (down, unreachable, too slow, refusing), the request is
limited by this process's own bucket instead: the vault fails open to the ``"memory"``
behaviour, never to no limit and never to a 503. A warning is logged at most once per
:data:`WARN_EVERY`; Redis is not asked again by any request until a background ping
(at most one per :data:`RETRY_EVERY`) finds it answering, so a dead Redis costs a
request its timeout only while the outage is being discovered.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

from cardvault.errors import ConfigurationError, RateLimitError
from cardvault.logging import get_logger

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from cardvault.vault.settings import LimitSettings

__all__ = [
    "BUCKET_SCRIPT",
    "KeyLimits",
    "RateLimiter",
    "RedisBuckets",
    "key_limits",
    "retry_after",
]

_log = get_logger("cardvault.vault.ratelimit")

#: Seconds between background pings of a Redis that did not answer.
RETRY_EVERY: Final = 1.0
#: Seconds between two warnings that Redis does not answer.
WARN_EVERY: Final = 30.0
#: Connections to Redis per process, and the prefix of the buckets' keys.
MAX_CONNECTIONS: Final = 64
KEY_PREFIX: Final = "cardvault:rl"

#: The token bucket, refilled and taken from atomically. KEYS[1]: the bucket (a hash:
#: ``tokens``, and ``ts``, the server time of the last take in microseconds); ARGV:
#: rate (tokens a second) and burst. Answers ``{1, tokens left}`` when a token was
#: taken, ``{0, tokens}`` (fewer than one) when none was; tokens as a string, since Lua
#: numbers become integers in a Redis reply. The key expires when the bucket would be
#: full again: a bucket that is gone and a full one are the same bucket.
BUCKET_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(saved[1])
local ts = tonumber(saved[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed / 1000000 * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'ts', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1)
return {taken, string.format('%.17g', tokens)}
"""
_SCRIPT_SHA: Final = hashlib.sha1(BUCKET_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def retry_after(tokens: float, rate: float) -> int:
    """Whole seconds, at least 1, until a bucket holding ``tokens`` (< 1) has one."""
    return max(1, math.ceil((1 - tokens) / rate))


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> None:
        """Take one token for ``key``, or raise RateLimitError with Retry-After."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimitError(headers={"Retry-After": str(retry_after(tokens, self.rate))})
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()


class RedisBuckets:
    """Token buckets in Redis, shared by every process that uses the same Redis and
    key prefix (:data:`BUCKET_SCRIPT`). :meth:`take` answers None when Redis did not
    answer; the caller then limits on its own (see the module's docstring)."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = KEY_PREFIX,
        retry_every: float = RETRY_EVERY,
        warn_every: float = WARN_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.exceptions import RedisError

        self.client, self.prefix = client, prefix
        self.retry_every, self.warn_every, self._clock = retry_every, warn_every, clock
        self._unavailable: tuple[type[BaseException], ...] = (
            RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        #: False from a failure until a background ping succeeds.
        self.up = True
        self._next_ping = 0.0
        self._ping: asyncio.Task[None] | None = None
        self._warned: float | None = None

    @classmethod
    def connect(
        cls, url: str, *, timeout: float = 0.25, ca_file: Path | None = None, **kwargs: Any
    ) -> RedisBuckets:
        """Buckets on the Redis at ``url`` (``redis://`` or ``rediss://``: TLS, with the
        server's certificate and host name verified against the system's CAs or
        ``ca_file``). Every connect, read and write gives up after ``timeout`` seconds and
        is not retried; at most :data:`MAX_CONNECTIONS` connections, and a request waits
        at most ``timeout`` for one. Connections are made when first needed."""
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        check_redis_url(url)
        tls: dict[str, Any] = {}
        if urlsplit(url).scheme == "rediss":
            tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
            if ca_file is not None:
                tls["ssl_ca_certs"] = str(ca_file)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            **tls,
        )
        return cls(Redis(connection_pool=pool), **kwargs)

    async def take(
        self, kind: str, key_id: str, rate: float, burst: float
    ) -> tuple[bool, float] | None:
        """Take one token from the bucket of ``key_id`` of ``kind``: ``(True, tokens
        left)`` when one was taken, ``(False, tokens)`` (fewer than 1) when none was,
        None when Redis did not answer."""
        if not self.up:
            self._ping_later()
            return None
        try:
            return await self._run(f"{self.prefix}:{kind}:{key_id}", rate, burst)
        except self._unavailable as exc:
            self._failed(exc)
            return None

    async def _run(self, key: str, rate: float, burst: float) -> tuple[bool, float]:
        from redis.exceptions import NoScriptError

        args = (key, repr(float(rate)), repr(float(burst)))
        try:
            reply = await _awaited(self.client.evalsha(_SCRIPT_SHA, 1, *args))
        except NoScriptError:
            # Redis restarted, or its script cache was flushed: EVAL loads it again.
            reply = await _awaited(self.client.eval(BUCKET_SCRIPT, 1, *args))
        taken, tokens = reply
        return bool(int(taken)), float(tokens)

    def _failed(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self._next_ping = self._clock() + self.retry_every
        self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        now = self._clock()
        if self._warned is None or now - self._warned >= self.warn_every:
            self._warned = now
            _log.warning(
                "rate limits: Redis does not answer; each process limits on its own until it does",
                error=type(exc).__name__,
            )

    def _ping_later(self) -> None:
        """Start one background ping when the last one is old enough."""
        now = self._clock()
        if now < self._next_ping or (self._ping is not None and not self._ping.done()):
            return
        self._next_ping = now + self.retry_every
        # A context of its own: what it logs belongs to no request.
        self._ping = asyncio.get_running_loop().create_task(
            self._ping_once(), context=contextvars.Context()
        )

    async def _ping_once(self) -> None:
        try:
            await _awaited(self.client.ping())
        except self._unavailable as exc:
            self._warn(exc)
            return
        self.up = True
        _log.info("rate limits: Redis answers again; the buckets are shared again")

    async def close(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
        await self.client.aclose()


async def _awaited(value: Any) -> Any:
    """redis-py's commands are typed for its synchronous and asyncio clients at once."""
    return await value if isinstance(value, Awaitable) else value


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL that is not ``redis://`` or ``rediss://``, or that carries
    options in its query string (which could turn certificate checks off): only ``db``
    may be given there. The message never holds the URL, which may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigurationError(
            "setting limits.redis_url must be redis://host:port/db or rediss://host:port/db"
        )
    if any(name != "db" for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ConfigurationError(
            "setting limits.redis_url may carry no options but db: TLS and timeouts are "
            "limits.redis_ca_file and limits.redis_timeout"
        )


@dataclass(frozen=True)
class KeyLimits:
    """One API's buckets: one per secret key, and a smaller one per publishable key.
    With ``shared``, the buckets are in Redis and ``secret`` and ``publishable`` (their
    rates and bursts) serve only while Redis does not answer."""

    secret: RateLimiter
    publishable: RateLimiter
    shared: RedisBuckets | None = None

    async def check(self, kind: str, key_id: str) -> None:
        """Take one token for the key ``key_id`` of ``kind``, or raise RateLimitError."""
        local = self.publishable if kind == "publishable" else self.secret
        if self.shared is not None:
            answer = await self.shared.take(kind, key_id, local.rate, local.burst)
            if answer is not None:
                taken, tokens = answer
                if not taken:
                    wait = retry_after(tokens, local.rate)
                    raise RateLimitError(headers={"Retry-After": str(wait)})
                return
        local.check(key_id)


def key_limits(settings: LimitSettings) -> KeyLimits:
    """The API's buckets as ``[limits]`` says. Raises ConfigurationError on bad
    settings."""
    for name in ("secret", "publishable"):
        rate, burst = getattr(settings, f"{name}_rate"), getattr(settings, f"{name}_burst")
        if not rate > 0 or not burst >= 1:
            raise ConfigurationError(
                f"limits.{name}_rate must be above 0 and limits.{name}_burst at least 1"
            )
    secret = RateLimiter(settings.secret_rate, settings.secret_burst)
    publishable = RateLimiter(settings.publishable_rate, settings.publishable_burst)
    if settings.backend == "memory":
        return KeyLimits(secret, publishable)
    if settings.redis_url is None:
        raise ConfigurationError(
            'missing required setting limits.redis_url (limits.backend is "redis"): set it '
            "in the configuration file, in CARDVAULT_LIMITS_REDIS_URL, or in a file named by "
            "limits.redis_url_file or CARDVAULT_LIMITS_REDIS_URL_FILE"
        )
    if not settings.redis_timeout > 0:
        raise ConfigurationError("limits.redis_timeout must be above 0")
    shared = RedisBuckets.connect(
        settings.redis_url.reveal(), timeout=settings.redis_timeout, ca_file=settings.redis_ca_file
    )
    return KeyLimits(secret, publishable, shared)
