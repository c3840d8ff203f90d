"""Tests for ``dns.parse_cache``: a repeat gives exactly what a fresh parse gives, bad input still
raises, only a repeat is kept parsed, and the cache stays within its cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fqdnproxy.dns import parse_cache, wire
from tests.dns.test_wire import PROPERTY, A, answer_st, dnslib_message, query, response, rr


def with_id(data: bytes, id_: int) -> bytes:
    return id_.to_bytes(2, "big") + bytes(data[2:])


@PROPERTY
@given(answer_st(), st.integers(0, 0xFFFF))
def test_property_a_repeated_answer_parses_as_a_fresh_one(message, other_id):
    cache = parse_cache.ParseCache()
    data = bytes(dnslib_message(*message))
    again = with_id(data, other_id)
    assert cache.response(data) == wire.parse_response(data)  # seen: bytes remembered
    assert cache.response(data) == wire.parse_response(data)  # a repeat: parsed and kept
    assert cache.response(again) == wire.parse_response(again)  # from the cache, new ID
    assert cache.response(again).header.id == other_id
    assert cache.stats()["response"].hits == 2


@PROPERTY
@given(st.text(alphabet="abcdefgh.", min_size=1, max_size=30).filter(
    lambda n: ".." not in n and not n.startswith(".")), st.booleans(), st.integers(0, 0xFFFF))
def test_property_a_repeated_query_parses_as_a_fresh_one(name, edns, other_id):
    cache = parse_cache.ParseCache()
    data = bytes(query(name, "AAAA", edns=edns))
    again = with_id(data, other_id)
    assert cache.query(data) == wire.parse_query(data)
    assert cache.query(data) == wire.parse_query(data)
    assert cache.query(again) == wire.parse_query(again)
    assert cache.query(again).header.id == other_id
    assert cache.stats()["query"].hits == 2


def test_tcp_bytearrays_are_looked_up_like_bytes():
    cache = parse_cache.ParseCache()
    data = bytes(query("www.example.com"))
    cache.query(data)
    cache.query(bytearray(with_id(data, 9)))  # the repeat: kept
    assert cache.query(bytearray(with_id(data, 7))) == wire.parse_query(with_id(data, 7))
    assert cache.stats()["query"].hits == 1


def test_bad_messages_raise_every_time_and_are_not_remembered():
    cache = parse_cache.ParseCache()
    bad = bytes(query("www.example.com"))[:-3]  # the question is cut short
    for _ in range(2):
        with pytest.raises(wire.WireError):
            cache.query(bad)
        with pytest.raises(wire.WireError):
            cache.response(bad)
    assert set(cache.sizes().values()) == {0}
    assert cache.stats()["query"].misses == 2


def test_the_oldest_goes_at_the_cap_and_is_counted():
    cache = parse_cache.ParseCache(capacity=3)
    messages = [bytes(query(f"n{i}.example.com")) for i in range(5)]
    for data in messages:
        cache.query(data)  # seen
        cache.query(data)  # repeated: kept
    assert cache.sizes()["query"] == 3
    assert cache.stats()["query"].evictions == 2
    cache.query(messages[4])  # still there
    cache.query(messages[0])  # evicted: parsed again
    stats = cache.stats()["query"]
    assert (stats.hits, stats.misses) == (1, 11)


def test_a_message_seen_once_is_kept_as_bytes_only():
    cache = parse_cache.ParseCache(capacity=3)
    messages = [bytes(query(f"once{i}.example.com")) for i in range(5)]
    for data in messages:  # a pass over new names: nothing repeats
        cache.query(data)
    assert cache.sizes()["query"] == 0  # no parsed message kept
    assert cache.sizes()["query_seen"] == 3  # the same cap, the oldest gone
    assert cache.stats()["query_seen"].evictions == 2
    cache.query(messages[4])  # its repeat: parsed into the cache, gone from the seen ones
    assert cache.sizes() == {"query": 1, "response": 0, "query_seen": 2, "response_seen": 0}
    assert cache.stats()["query_seen"].hits == 1


def test_large_answers_are_parsed_every_time():
    answers = [rr("big.example.com", "A", 60, A(f"10.0.{i // 250}.{i % 250}")) for i in range(100)]
    data = bytes(response("big.example.com", answers))
    assert len(data) > parse_cache.MAX_MESSAGE
    cache = parse_cache.ParseCache()
    for _ in range(2):
        assert cache.response(data) == wire.parse_response(data)
    assert cache.sizes()["response"] == 0


def test_capacity_zero_remembers_nothing():
    cache = parse_cache.ParseCache(capacity=0)
    data = bytes(query("www.example.com"))
    cache.query(data)
    cache.query(data)
    assert set(cache.sizes().values()) == {0} and cache.stats()["query"].misses == 2
