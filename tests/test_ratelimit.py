"""ratelimit.py: token buckets per client."""

from __future__ import annotations

from fqdnproxy.ratelimit import RateLimit, TokenBuckets


def test_burst_then_rate() -> None:
    buckets = TokenBuckets(RateLimit(rate=10, burst=5))
    assert [buckets.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert buckets.allow("a", 0.05) is False  # half a token
    assert buckets.allow("a", 0.1) is True  # one token after 0.1 s at 10/s
    assert buckets.allow("b", 0.1) is True  # others are not affected


def test_buckets_refill_to_burst_at_most() -> None:
    buckets = TokenBuckets(RateLimit(rate=100, burst=3))
    for _ in range(3):
        buckets.allow("a", 0.0)
    assert sum(buckets.allow("a", 100.0) for _ in range(10)) == 3


def test_client_count_is_capped() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=1, max_clients=3))
    for key in "abcd":
        buckets.allow(key, 0.0)
    assert len(buckets) == 3 and buckets.evictions == 1
    assert buckets.allow("a", 0.0) is True  # evicted: starts over with a full bucket
