"""Per-key rate limits: a token bucket per API key, in this process.

Publishable keys get a much smaller bucket: they sit in web pages, and card testers use
them to try stolen numbers. A replicated deployment divides the configured rate by the
number of replicas, or moves the buckets to Redis (planned).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cardvault.errors import RateLimitError

__all__ = ["KeyLimits", "RateLimiter"]


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
            wait = max(1, math.ceil((1 - tokens) / self.rate))
            self._buckets[key] = (tokens, now)
            raise RateLimitError(headers={"Retry-After": str(wait)})
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()


@dataclass(frozen=True)
class KeyLimits:
    """One API's buckets: one per secret key, and a smaller one per publishable key."""

    secret: RateLimiter
    publishable: RateLimiter

    def check(self, kind: str, key_id: str) -> None:
        """Take one token for the key ``key_id`` of ``kind``, or raise RateLimitError."""
        (self.publishable if kind == "publishable" else self.secret).check(key_id)
