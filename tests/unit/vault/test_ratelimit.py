"""Rate limits: the in-process bucket, the Redis bucket (its Lua script against a real
redis-server of the test's own) and what happens when Redis does not answer."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from cardvault.config import Secret
from cardvault.errors import ConfigurationError, RateLimitError
from cardvault.vault.ratelimit import KeyLimits, RateLimiter, RedisBuckets, key_limits
from cardvault.vault.settings import LimitSettings
from helpers import Pki, free_port
from redis_support import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the bucket tests; each test uses keys of its own prefix."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server the test may kill, pause and restart."""
    with redis_server(tmp_path / "redis") as server:
        yield server


def prefix() -> str:
    return f"test:{secrets.token_hex(6)}"


def limits(buckets: RedisBuckets | None, rate: float, burst: float) -> KeyLimits:
    return KeyLimits(RateLimiter(rate, burst), RateLimiter(rate, burst), buckets)


async def taken(lim: KeyLimits, n: int, key: str = "key_1") -> int:
    ok = 0
    for _ in range(n):
        try:
            await lim.check("secret", key)
            ok += 1
        except RateLimitError:
            pass
    return ok


def retry_after_of(lim: KeyLimits, key: str = "key_1") -> int:
    async def main() -> int:
        with pytest.raises(RateLimitError) as refused:
            await lim.check("secret", key)
        return int(refused.value.headers["Retry-After"])

    return asyncio.run(main())


# --- the in-process bucket -------------------------------------------------------------


def test_memory_bucket_bursts_refills_and_says_when() -> None:
    now = [100.0]
    bucket = RateLimiter(2.0, 3.0, clock=lambda: now[0])
    for _ in range(3):
        bucket.check("k")
    with pytest.raises(RateLimitError) as refused:
        bucket.check("k")
    assert refused.value.headers == {"Retry-After": "1"}
    now[0] += 1.0  # two tokens back
    bucket.check("k")
    bucket.check("k")
    with pytest.raises(RateLimitError):
        bucket.check("k")
    slow = RateLimiter(0.25, 1.0, clock=lambda: now[0])
    slow.check("k")
    with pytest.raises(RateLimitError) as refused:
        slow.check("k")
    assert refused.value.headers == {"Retry-After": "4"}


# --- the Redis bucket ------------------------------------------------------------------


def test_redis_bucket_allows_the_burst_then_refuses(redis: RedisServer) -> None:
    async def main() -> tuple[int, int]:
        buckets = RedisBuckets.connect(redis.url, prefix=prefix())
        lim = limits(buckets, rate=0.01, burst=5)
        first = await taken(lim, 8)
        other = await taken(lim, 8, key="key_2")  # a bucket per key
        await buckets.close()
        return first, other

    assert asyncio.run(main()) == (5, 5)


def test_redis_bucket_refills_at_its_rate_up_to_the_burst(redis: RedisServer) -> None:
    async def main() -> tuple[int, int, int]:
        buckets = RedisBuckets.connect(redis.url, prefix=prefix())
        lim = limits(buckets, rate=20, burst=3)
        emptied = await taken(lim, 5)
        await asyncio.sleep(0.6)  # 12 tokens' worth of time: the bucket holds 3
        refilled = await taken(lim, 6)
        # A steady caller gets the rate: over 1 s about 20 (plus what was left).
        start, ok = time.monotonic(), 0
        while time.monotonic() - start < 1.0:
            ok += await taken(lim, 1)
            await asyncio.sleep(0.005)
        await buckets.close()
        return emptied, refilled, ok

    emptied, refilled, steady = asyncio.run(main())
    assert emptied == 3
    assert refilled == 3
    assert 15 <= steady <= 25


def test_redis_bucket_retry_after_is_whole_seconds_at_least_one(redis: RedisServer) -> None:
    async def main() -> tuple[int, int]:
        out = []
        for rate in (0.25, 50.0):
            buckets = RedisBuckets.connect(redis.url, prefix=prefix())
            lim = limits(buckets, rate=rate, burst=1)
            assert await taken(lim, 1) == 1
            with pytest.raises(RateLimitError) as refused:
                await lim.check("secret", "key_1")
            out.append(int(refused.value.headers["Retry-After"]))
            await buckets.close()
        return out[0], out[1]

    # 1 token at 0.25/s: 4 s; at 50/s, 20 ms, said as 1 s.
    assert asyncio.run(main()) == (4, 1)


def test_redis_bucket_key_is_namespaced_and_expires_when_full_again(
    redis: RedisServer,
) -> None:
    async def main() -> tuple[list[bytes], int, int, bool, int]:
        p = prefix()
        buckets = RedisBuckets.connect(redis.url, prefix=p)
        lim = limits(buckets, rate=10, burst=3)
        await lim.check("secret", "key_abc")
        await lim.check("publishable", "key_abc")
        raw = Redis.from_url(redis.url)
        keys = sorted(await raw.keys(f"{p}:*"))
        # 2 tokens left of 3, at 10/s: full again in 100 ms, and gone then.
        ttl = await raw.pttl(f"{p}:secret:key_abc")
        saved = await raw.hmget(f"{p}:secret:key_abc", ["tokens", "ts"])
        seconds, micros = await raw.time()
        skew = abs(int(saved[1]) - (seconds * 1_000_000 + micros))
        await asyncio.sleep(0.3)
        gone = not await raw.exists(f"{p}:secret:key_abc")
        # A bucket that vanished is a full one.
        again = await taken(lim, 5, key="key_abc")
        await raw.aclose()
        await buckets.close()
        return keys, ttl, skew, gone, again

    keys, ttl, skew, gone, again = asyncio.run(main())
    assert [k.decode().rsplit(":", 2)[1:] for k in keys] == [
        ["publishable", "key_abc"],
        ["secret", "key_abc"],
    ]
    assert 0 < ttl <= 101
    assert skew < 1_000_000  # the bucket's time is the Redis server's
    assert gone
    assert again == 3


def test_redis_bucket_is_atomic_across_clients(redis: RedisServer) -> None:
    """Two clients (as two processes would be) racing on one key: exactly the burst."""

    async def main() -> int:
        p = prefix()
        a, b = RedisBuckets.connect(redis.url, prefix=p), RedisBuckets.connect(redis.url, prefix=p)
        la, lb = limits(a, rate=0.001, burst=50), limits(b, rate=0.001, burst=50)
        results = await asyncio.gather(
            *(taken(la if i % 2 else lb, 5) for i in range(40)), return_exceptions=False
        )
        await a.close()
        await b.close()
        return sum(results)

    assert asyncio.run(main()) == 50


def test_redis_bucket_survives_a_flushed_script_cache(redis: RedisServer) -> None:
    async def main() -> tuple[int, bool]:
        buckets = RedisBuckets.connect(redis.url, prefix=prefix())
        lim = limits(buckets, rate=0.01, burst=4)
        first = await taken(lim, 2)
        raw = Redis.from_url(redis.url)
        await raw.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        second = await taken(lim, 4)
        await raw.aclose()
        await buckets.close()
        return first + second, buckets.up

    assert asyncio.run(main()) == (4, True)


# --- when Redis does not answer --------------------------------------------------------


def test_unreachable_redis_falls_back_to_the_process_bucket_without_waiting() -> None:
    """A closed port: each request is limited in this process, and after the first
    failure no request waits on Redis again."""

    async def main() -> tuple[int, float, int]:
        buckets = RedisBuckets.connect(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix())
        lim = limits(buckets, rate=0.01, burst=5)
        with capture_logs() as logs:
            first = await taken(lim, 1)
            start = time.monotonic()
            rest = await taken(lim, 200)
            elapsed = time.monotonic() - start
        await buckets.close()
        warnings = [e for e in logs if e["log_level"] == "warning"]
        return first + rest, elapsed, len(warnings)

    ok, elapsed, warnings = asyncio.run(main())
    assert ok == 5  # the local bucket: burst 5, still limited
    assert elapsed < 0.2
    assert warnings == 1  # at most once per interval


def test_killed_redis_falls_back_then_is_used_again_when_back(own_redis: RedisServer) -> None:
    async def main() -> None:
        p = prefix()
        buckets = RedisBuckets.connect(own_redis.url, prefix=p, retry_every=0.1)
        lim = limits(buckets, rate=0.01, burst=3)
        assert await taken(lim, 1, key="before") == 1
        raw = Redis.from_url(own_redis.url)
        assert await raw.exists(f"{p}:secret:before")
        await raw.aclose()

        own_redis.kill()
        with capture_logs() as logs:
            down = await taken(lim, 10, key="during")
            assert down == 3  # limited all the same, in this process
            assert not buckets.up
            own_redis.start()  # empty: a restarted Redis keeps nothing here
            deadline = time.monotonic() + 5
            while not buckets.up and time.monotonic() < deadline:
                await taken(lim, 1, key="probe")
                await asyncio.sleep(0.05)
        assert buckets.up
        events = [e["event"] for e in logs]
        assert sum("does not answer" in e for e in events) == 1
        assert any("answers again" in e for e in events)

        # Redis is used again: the bucket is there, and shared with a second client.
        assert await taken(lim, 1, key="after") == 1
        raw = Redis.from_url(own_redis.url)
        assert await raw.exists(f"{p}:secret:after")
        await raw.aclose()
        other = RedisBuckets.connect(own_redis.url, prefix=p)
        assert await taken(limits(other, rate=0.01, burst=3), 5, key="after") == 2
        await other.close()
        await buckets.close()

    asyncio.run(main())


def test_a_redis_that_hangs_costs_one_timeout_then_none(own_redis: RedisServer) -> None:
    """SIGSTOP: connections open but nothing answers, the socket timeout ends the wait."""

    async def main() -> tuple[float, float, int]:
        buckets = RedisBuckets.connect(own_redis.url, prefix=prefix(), timeout=0.25)
        lim = limits(buckets, rate=0.01, burst=3)
        assert await taken(lim, 1) == 1  # connected, through Redis
        own_redis.pause()
        try:
            start = time.monotonic()
            first = await taken(lim, 1)
            first_wait = time.monotonic() - start
            start = time.monotonic()
            rest = await taken(lim, 50)
            rest_wait = time.monotonic() - start
        finally:
            own_redis.resume()
        await buckets.close()
        return first_wait, rest_wait, first + rest

    first_wait, rest_wait, ok = asyncio.run(main())
    assert 0.2 <= first_wait < 1.0
    assert rest_wait < 0.2
    assert ok == 3  # the process's own bucket, full: 3 of 51


def test_rediss_verifies_the_server_certificate_and_its_name(tmp_path: Path, pki: Pki) -> None:
    """TLS to Redis: with the CA that signed its certificate it is used; with the
    system's CAs only, or with a certificate for another name, the handshake fails and
    the process limits on its own."""
    pki.ca.issue("redis", dns=["localhost"], ips=["127.0.0.1"], out_dir=tmp_path)
    pki.ca.issue("elsewhere", dns=["elsewhere.example"], out_dir=tmp_path)

    async def used(url: str, ca_file: Path | None) -> bool:
        buckets = RedisBuckets.connect(url, prefix=prefix(), ca_file=ca_file)
        assert await taken(limits(buckets, 1, 5), 1) == 1
        await buckets.close()
        return buckets.up

    for name in ("redis", "elsewhere"):
        tls = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key", pki.ca_file)
        with redis_server(tmp_path / f"redis-{name}", tls=tls) as server:
            trusted = asyncio.run(used(server.url, pki.ca_file))
            untrusted = asyncio.run(used(server.url, None))
        assert (name, trusted, untrusted) == (name, name == "redis", False)


# --- settings --------------------------------------------------------------------------


def test_settings_choose_the_backend_and_refuse_unsafe_urls() -> None:
    assert key_limits(LimitSettings()).shared is None
    with pytest.raises(ConfigurationError, match=r"limits\.redis_url"):
        key_limits(LimitSettings(backend="redis"))
    for url in (
        "rediss://:hunter2@localhost:6380/0?ssl_cert_reqs=none",
        "rediss://:hunter2@localhost:6380/0?ssl_check_hostname=false",
        "http://:hunter2@localhost:6380/0",
    ):
        with pytest.raises(ConfigurationError) as refused:
            key_limits(LimitSettings(backend="redis", redis_url=Secret(url)))
        assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigurationError, match="secret_rate"):
        key_limits(LimitSettings(secret_rate=0))
    shared = key_limits(
        LimitSettings(backend="redis", redis_url=Secret("redis://127.0.0.1:6379/5?db=5"))
    ).shared
    assert shared is not None
    asyncio.run(shared.close())
