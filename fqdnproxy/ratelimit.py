"""Per-client query rate limits: token buckets, so one noisy pod cannot starve the others.

Each source address gets ``rate`` queries per second with bursts up to ``burst``. Buckets live in
a dict kept in insertion order; past ``max_clients`` the oldest bucket is dropped (a returning
client simply starts with a full bucket). Pure: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """See ``config.DnsConfig`` for the documented defaults; ``rate`` 0 turns limiting off."""

    rate: float = 1_000.0  # queries per second per client address
    burst: float = 2_000.0  # queries a client may send at once after being quiet
    max_clients: int = 65_536  # buckets kept; the oldest goes first


class TokenBuckets:
    """``allow(key, now)``: may this client send one more query now?"""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        # key -> [tokens, last refill time, second of the last reported refusal]
        self._buckets: dict[str, list[float]] = {}
        self.evictions = 0

    def allow(self, key: str, now: float) -> bool:
        """Take a token for ``key``; False when its bucket is empty. O(1)."""
        limit = self.limit
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= limit.max_clients:
                del self._buckets[next(iter(self._buckets))]
                self.evictions += 1
            bucket = self._buckets[key] = [limit.burst, now, -1.0]
        else:
            tokens = bucket[0] + (now - bucket[1]) * limit.rate
            bucket[0] = tokens if tokens < limit.burst else limit.burst
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False

    def report(self, key: str, now: float) -> bool:
        """True for the first refusal of ``key`` in each second: audit one, count the rest."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket[2] == int(now):
            return False
        bucket[2] = int(now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
