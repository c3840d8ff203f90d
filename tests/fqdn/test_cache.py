"""fqdn/cache.py: per-endpoint learned IPs, expiry, caps and eviction."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fqdnproxy.fqdn.cache import CacheLimits, FqdnCache

S = 1_000_000_000  # one second in ns


def test_learn_and_read_back_per_endpoint() -> None:
    cache = FqdnCache()
    assert cache.learn(1, "api.test.", [("192.0.2.1", 10 * S), ("192.0.2.2", 20 * S)]) == {
        "192.0.2.1", "192.0.2.2"}
    assert cache.ips(1, "api.test.") == {"192.0.2.1": 10 * S, "192.0.2.2": 20 * S}
    assert cache.ips(2, "api.test.") == {}  # endpoint 2 learned nothing
    assert len(cache) == 2 and cache.names(1) == ["api.test."]


def test_a_repeat_lookup_never_shortens_a_lifetime() -> None:
    cache = FqdnCache()
    cache.learn(1, "api.test.", [("192.0.2.1", 30 * S)])
    assert cache.learn(1, "api.test.", [("192.0.2.1", 10 * S)]) == set()  # nothing changed
    assert cache.ips(1, "api.test.") == {"192.0.2.1": 30 * S}
    cache.learn(1, "api.test.", [("192.0.2.1", 40 * S)])
    assert cache.ips(1, "api.test.") == {"192.0.2.1": 40 * S}
    assert len(cache) == 1


def test_holders_index_an_ip_under_several_names() -> None:
    cache = FqdnCache()
    cache.learn(1, "a.test.", [("192.0.2.1", 10 * S)])
    cache.learn(1, "b.test.", [("192.0.2.1", 20 * S)])
    assert cache.holders(1, "192.0.2.1") == {"a.test.": 10 * S, "b.test.": 20 * S}
    assert cache.holders(2, "192.0.2.1") == {}


def test_expire_is_bounded_and_in_order_and_skips_refreshed_entries() -> None:
    cache = FqdnCache()
    for i in range(10):
        cache.learn(1, f"n{i}.test.", [(f"192.0.2.{i}", (i + 1) * S)])
    cache.learn(1, "n0.test.", [("192.0.2.0", 100 * S)])  # refreshed: its old heap item is stale
    assert cache.expire(5 * S, budget=3) == [(1, "192.0.2.1"), (1, "192.0.2.2"), (1, "192.0.2.3")]
    assert cache.expire(5 * S, budget=100) == [(1, "192.0.2.4")]
    assert len(cache) == 6
    assert cache.ips(1, "n0.test.") == {"192.0.2.0": 100 * S}


def test_ips_per_name_cap_evicts_the_soonest_to_expire() -> None:
    cache = FqdnCache(CacheLimits(max_ips_per_name=3))
    cache.learn(1, "many.test.", [(f"192.0.2.{i}", (10 - i) * S) for i in range(5)])
    assert cache.ips(1, "many.test.") == {"192.0.2.0": 10 * S, "192.0.2.1": 9 * S,
                                           "192.0.2.2": 8 * S}
    assert cache.evictions["ips_per_name"] == 2 and len(cache) == 3


def test_names_per_endpoint_cap_evicts_the_least_recently_looked_up() -> None:
    cache = FqdnCache(CacheLimits(max_names_per_endpoint=2))
    cache.learn(1, "a.test.", [("192.0.2.1", 10 * S)])
    cache.learn(1, "b.test.", [("192.0.2.2", 10 * S)])
    cache.learn(1, "a.test.", [("192.0.2.1", 10 * S)])  # a is now the most recent
    touched = cache.learn(1, "c.test.", [("192.0.2.3", 10 * S)])
    assert cache.names(1) == ["a.test.", "c.test."]
    assert "192.0.2.2" in touched  # the caller must rewrite or delete b's IP
    assert cache.evictions["names_per_endpoint"] == 1
    cache.learn(2, "x.test.", [("192.0.2.9", 10 * S)])  # the cap is per endpoint
    assert cache.names(2) == ["x.test."]


def test_total_cap_evicts_the_soonest_to_expire_anywhere() -> None:
    cache = FqdnCache(CacheLimits(max_entries=3))
    cache.learn(1, "a.test.", [("192.0.2.1", 50 * S)])
    cache.learn(2, "b.test.", [("192.0.2.2", 5 * S)])
    cache.learn(3, "c.test.", [("192.0.2.3", 60 * S)])
    cache.learn(1, "d.test.", [("192.0.2.4", 70 * S)])
    assert len(cache) == 3 and cache.ips(2, "b.test.") == {}
    assert cache.evictions["entries"] == 1


def test_remove_endpoint_and_name() -> None:
    cache = FqdnCache()
    cache.learn(1, "a.test.", [("192.0.2.1", 10 * S)])
    cache.learn(1, "b.test.", [("192.0.2.2", 10 * S)])
    cache.learn(2, "a.test.", [("192.0.2.1", 10 * S)])
    assert cache.remove_name(1, "a.test.") == {"192.0.2.1"}
    assert cache.holders(1, "192.0.2.1") == {} and cache.holders(2, "192.0.2.1")
    assert cache.remove_endpoint(1) == {"192.0.2.2"}
    assert len(cache) == 1 and cache.endpoint_ids() == [2]
    assert cache.expire(100 * S, 100) == [(2, "192.0.2.1")]  # stale items of 1 skipped
    assert len(cache) == 0


def test_heap_stays_within_twice_the_entries_under_refresh_storms() -> None:
    cache = FqdnCache()
    for t in range(5_000):
        cache.learn(1, "hot.test.", [("192.0.2.1", (t + 1) * S)])
    assert len(cache._heap) <= 2 * len(cache) + 1024


def test_headroom_spares_repeat_lookups_a_raise() -> None:
    cache = FqdnCache()
    assert cache.learn(1, "a.test.", [("192.0.2.1", 100 * S)], now_ns=0, headroom=0.1) == {
        "192.0.2.1"}
    assert cache.ips(1, "a.test.") == {"192.0.2.1": 110 * S}
    # 5 s later the same TTL needs 105 s: within the 110 s granted, nothing to write.
    assert cache.learn(1, "a.test.", [("192.0.2.1", 105 * S)], now_ns=5 * S, headroom=0.1) == set()
    # 20 s later it needs 120 s: raised, with new headroom.
    assert cache.learn(1, "a.test.", [("192.0.2.1", 120 * S)], now_ns=20 * S, headroom=0.1) == {
        "192.0.2.1"}
    assert cache.ips(1, "a.test.") == {"192.0.2.1": 130 * S}


def test_one_answer_is_one_heap_item_and_a_budget_can_split_it() -> None:
    cache = FqdnCache()
    cache.learn(1, "many.test.", [(f"192.0.2.{i}", 10 * S) for i in range(5)])
    cache.learn(1, "late.test.", [("192.0.2.9", 20 * S)])
    assert len(cache._heap) == 2
    assert cache.expire(30 * S, budget=2) == [(1, "192.0.2.0"), (1, "192.0.2.1")]
    # the rest of the answer still goes first
    assert cache.expire(30 * S, budget=4) == [(1, "192.0.2.2"), (1, "192.0.2.3"),
                                               (1, "192.0.2.4"), (1, "192.0.2.9")]
    assert len(cache) == 0


def test_total_cap_evicts_one_ip_of_an_answer_at_a_time() -> None:
    cache = FqdnCache(CacheLimits(max_entries=4))
    cache.learn(1, "a.test.", [(f"192.0.2.{i}", 10 * S) for i in range(3)])
    touched = cache.learn(1, "b.test.", [("192.0.2.7", 50 * S), ("192.0.2.8", 50 * S)])
    assert touched == {"192.0.2.0", "192.0.2.7", "192.0.2.8"}
    assert cache.ips(1, "a.test.") == {"192.0.2.1": 10 * S, "192.0.2.2": 10 * S}
    assert cache.evictions["entries"] == 1
    assert cache.expire(10 * S, 100) == [(1, "192.0.2.1"), (1, "192.0.2.2")]


def test_the_ips_of_one_answer_share_one_expiry_object() -> None:
    cache = FqdnCache()
    cache.learn(1, "a.test.", [(f"192.0.2.{i}", 100 * S + 0) for i in range(3)], now_ns=0,
                headroom=0.1)
    values = list(cache._endpoints[1].names["a.test."].values())
    assert values == [110 * S] * 3 and len({id(v) for v in values}) == 1


def test_sole_holders_split_one_name_ips_from_shared_and_unknown_ones() -> None:
    from fqdnproxy import ipkey

    cache = FqdnCache()
    cache.learn(1, "a.test.", [("192.0.2.1", 10 * S), ("192.0.2.2", 20 * S), ("2001:db8::1", 5 * S)])
    cache.learn(1, "b.test.", [("192.0.2.2", 30 * S), ("192.0.2.3", 40 * S)])
    keys = [ipkey.key(ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "192.0.2.9")]
    sole, rest = cache.sole_holders_keys(1, keys)
    assert sole == {"a.test.": {keys[0]: 10 * S, keys[3]: 5 * S}, "b.test.": {keys[2]: 40 * S}}
    assert rest == [keys[1], keys[4]]  # two names; none
    for name, held in sole.items():
        for k, expiry in held.items():
            assert cache.holders_of_key(1, k) == {name: expiry}
    assert cache.sole_holders_keys(2, keys) == ({}, keys)  # an endpoint that learned nothing


def _state(cache: FqdnCache) -> tuple[object, ...]:
    """Everything a cache holds, in its order: entries, holders, heap, counts."""
    endpoints = {eid: (list(e.names.items()), dict(e.holders))
                 for eid, e in cache._endpoints.items()}
    return (endpoints, sorted(cache._heap), cache._heap_ips, len(cache), dict(cache.evictions))


_answers = st.lists(st.tuples(st.integers(1, 2), st.sampled_from(["a.test.", "b.test.", "c.test."]),
                              st.lists(st.integers(0, 12), max_size=6),
                              st.sampled_from([100, 200, 300]), st.integers(0, 50)),
                    max_size=25)


@given(_answers, st.sampled_from([0.0, 0.1]))
def test_learning_at_one_expiry_leaves_what_learn_keys_leaves(answers, headroom: float) -> None:
    limits = CacheLimits(max_ips_per_name=4, max_names_per_endpoint=2, max_entries=9)
    general, one_expiry = FqdnCache(limits), FqdnCache(limits)
    now = 0
    for endpoint_id, name, keys, ttl, advance in answers:
        now += advance
        expiry = now + ttl
        want = general.learn_keys(endpoint_id, name, [(k, expiry) for k in keys], now, headroom)
        got = one_expiry.learn_keys_at(endpoint_id, name, keys, expiry, now, headroom)
        assert got == want
        assert _state(one_expiry) == _state(general)
    assert one_expiry.expire_keys(now + 10_000, 100) == general.expire_keys(now + 10_000, 100)


@given(_answers, st.lists(st.integers(0, 14), max_size=8))
def test_sole_holders_agree_with_holders_of_each_key(answers, asked) -> None:
    cache = FqdnCache(CacheLimits(max_ips_per_name=4, max_names_per_endpoint=2, max_entries=9))
    for _, name, keys, ttl, _ in answers:
        cache.learn_keys(1, name, [(k, ttl) for k in keys])
    sole, rest = cache.sole_holders_keys(1, asked)
    want: dict[str, dict[int, int]] = {}
    for k in asked:
        holders = cache.holders_of_key(1, k)
        if len(holders) == 1:
            [(name, expiry)] = holders.items()
            want.setdefault(name, {})[k] = expiry
    assert sole == want
    assert rest == [k for k in asked if len(cache.holders_of_key(1, k)) != 1]
