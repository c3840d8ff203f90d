"""Pure tests: allow entries, their codecs, and the in-memory allow map's matching rule."""

from __future__ import annotations

import copy
import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fqdnproxy.datapath import allowmap, maps
from fqdnproxy.datapath.allowmap import (
    AllowEntry, AllowKey, HostAllows, InMemoryAllowMap, PortRange)
from fqdnproxy import ipkey


@pytest.mark.parametrize("text,expected", [
    ("tcp/443", PortRange(6, 443, 443)),
    ("udp/1000-2000", PortRange(17, 1000, 2000)),
    ("icmp", PortRange(1)),
    ("any", PortRange()),
])
def test_port_range_parse(text: str, expected: PortRange) -> None:
    assert PortRange.parse(text) == expected


@pytest.mark.parametrize("kwargs", [
    {"endpoint_id": -1, "network": "192.0.2.1/32"},
    {"endpoint_id": 1, "network": "192.0.2.1/24"},  # host bits set
    {"endpoint_id": 1, "network": "192.0.2.1/32", "expiry_ns": -5},
    {"endpoint_id": 1, "network": "192.0.2.1/32", "ports": ()},
    {"endpoint_id": 1, "network": "192.0.2.1/32", "ports": (PortRange(),) * 9},
])
def test_bad_entries_are_refused(kwargs: dict) -> None:
    with pytest.raises(allowmap.AllowEntryError):
        AllowEntry(**kwargs)


@pytest.mark.parametrize("net", ["192.0.2.1/32", "198.51.100.0/24", "2001:db8::5/128", "2001:db8::/48",
                                 "0.0.0.0/0"])
def test_codec_round_trip(net: str) -> None:
    entry = AllowEntry(7, net, 123, (PortRange(6, 80, 443), PortRange(17, 53, 53)))
    key = maps.encode_key(entry.key)
    assert isinstance(key, maps.ExactKey) == entry.key.exact
    assert maps.decode_value(maps.decode_key(key), maps.encode_value(entry)) == entry


def test_ipv4_trie_prefixlen_counts_endpoint_and_mapping_bits() -> None:
    assert maps.trie_prefixlen(ipaddress.ip_network("198.51.100.0/24")) == 32 + 96 + 24
    assert maps.trie_prefixlen(ipaddress.ip_network("2001:db8::/32")) == 32 + 32


def test_in_memory_map_matches_like_the_kernel() -> None:
    m = InMemoryAllowMap([
        AllowEntry(1, "203.0.113.0/24", 0, (PortRange(17, 9000, 9000),)),
        AllowEntry(1, "203.0.113.5/32", 100, (PortRange(6, 8080, 8080),)),
        AllowEntry(1, "203.0.0.0/16", 0, (PortRange(6, 22, 22),)),
    ])
    assert m.admits(1, "203.0.113.5", 6, 8080, now_ns=50)
    assert m.admits(1, "203.0.113.5", 17, 9000, now_ns=50)  # exact misses the port: the /24 applies
    assert not m.admits(1, "203.0.113.5", 6, 8080, now_ns=100)  # expired
    assert not m.admits(1, "203.0.113.9", 6, 22, now_ns=0)  # the trie returns only the /24
    assert m.admits(1, "203.0.7.1", 6, 22, now_ns=0)
    assert not m.admits(2, "203.0.113.5", 6, 8080, now_ns=0)
    assert m.gc(now_ns=100) == 1 and len(m) == 2
    assert m.delete_allows([AllowKey(1, ipaddress.ip_network("203.0.0.0/16"))]) == 1


def test_null_map_is_a_writer() -> None:
    writer: allowmap.AllowMapWriter = allowmap.NullAllowMap()
    writer.upsert_allows([AllowEntry(1, "192.0.2.1/32")])
    assert writer.delete_allows([AllowKey(1, ipaddress.ip_network("192.0.2.1/32"))]) == 0


def test_kernel_now_is_monotonic_ns() -> None:
    import time

    assert abs(allowmap.kernel_now_ns() - time.monotonic_ns()) < 1_000_000_000


def test_importable_without_bcc() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['bcc'] = None; "
            "from fqdnproxy.datapath import allowmap, maps, pinned; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "ok\n"


def test_trusted_entries_equal_checked_ones() -> None:
    ports = (PortRange(6, 443, 443),)
    for net in ("192.0.2.7/32", "2001:db8::7/128"):
        network = ipaddress.ip_network(net)
        trusted = AllowEntry.trusted(3, network, 5, ports)
        checked = AllowEntry(3, network, 5, ports)
        assert trusted == checked and hash(trusted) == hash(checked) and repr(trusted) == repr(checked)
        assert trusted.exact and trusted.key == checked.key
    assert not AllowEntry(3, "192.0.2.0/24").exact


def test_batch_packing_agrees_with_the_codecs() -> None:
    from fqdnproxy.datapath import pinned

    shared = (PortRange(6, 443, 443), PortRange(17, 53, 53))
    entries = [AllowEntry(1, "192.0.2.7/32", 10, shared), AllowEntry(2, "2001:db8::7/128", 0),
               AllowEntry(2**32 - 1, "198.51.100.1/32", 2**63, shared)]
    prefixes = [AllowEntry(1, "192.0.2.0/24", 0, shared), AllowEntry(2, "2001:db8::/64", 5)]
    mixed = [prefixes[0], *entries[:2], prefixes[1], entries[2], entries[0]]
    keys, values, trie = pinned._pack_exact(mixed)
    exact = [e for e in mixed if e.exact]
    assert keys == b"".join(bytes(maps.encode_key(e.key)) for e in exact)
    assert values == b"".join(bytes(maps.encode_value(e)) for e in exact)
    assert trie == prefixes


_host_keys = st.one_of(st.integers(0, 2**32 - 1), st.integers(ipkey.V6, ipkey.V6 + 2**128 - 1))
_port_sets = st.lists(st.builds(PortRange, st.sampled_from([0, 6, 17]), st.just(0),
                                st.integers(0, 65535)), min_size=1, max_size=maps.MAX_PORT_RANGES)


@given(endpoint=st.integers(0, 2**32 - 1), ports=_port_sets,
       hosts=st.lists(st.tuples(_host_keys, st.sampled_from([1, 10**12, 2**63])), max_size=40),
       shared=st.booleans())
def test_host_batch_packing_agrees_with_the_codecs(endpoint: int, ports: list[PortRange],
                                                   hosts: list[tuple[int, int]],
                                                   shared: bool) -> None:
    from fqdnproxy.datapath import pinned

    keys = [k for k, _ in hosts]
    expiries = [10**12] * len(hosts) if shared else [x for _, x in hosts]
    batch = HostAllows(endpoint, tuple(ports), keys, expiries)
    entries = batch.entries()
    assert [(e.endpoint_id, e.network, e.expiry_ns, e.ports) for e in entries] == [
        (endpoint, ipaddress.ip_network(ipkey.text(k)), x, tuple(ports))
        for k, x in zip(keys, expiries)]
    if not hosts:
        return
    assert pinned._pack_hosts(batch) == pinned._pack_exact(entries)[:2]


def test_the_in_memory_map_stores_a_host_batch_as_its_entries() -> None:
    batch = HostAllows(4, (PortRange(6, 443, 443),), [ipkey.key("192.0.2.9"),
                                                      ipkey.key("2001:db8::9")], [7, 8])
    writer = InMemoryAllowMap()
    writer.upsert_hosts(batch)
    assert writer.dump() == batch.entries() and len(batch) == 2


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.7", "255.255.255.255", "::",
                                     "2001:db8::7", "::ffff:192.0.2.7"])
def test_host_network_is_what_ip_network_builds(address: str) -> None:
    ip = ipaddress.ip_address(address)
    made = allowmap.host_network(ip.version, int(ip))
    real = ipaddress.ip_network(ip)
    assert allowmap._FAST_HOSTS  # on this Python the shortcut is in use, so it is what is tested
    assert made == real and hash(made) == hash(real) and type(made) is type(real)
    assert (str(made), repr(made), made.prefixlen, made.netmask, made.broadcast_address) == (
        str(real), repr(real), real.prefixlen, real.netmask, real.broadcast_address)
    assert list(made.hosts()) == list(real.hosts()) and made.__dict__.keys() == real.__dict__.keys()
    made_ip, real_ip = made.network_address, real.network_address
    assert made_ip == real_ip and hash(made_ip) == hash(real_ip) and type(made_ip) is type(real_ip)
    assert (str(made_ip), repr(made_ip), made_ip.packed, int(made_ip)) == (
        str(real_ip), repr(real_ip), real_ip.packed, int(real_ip))
    assert pickle.loads(pickle.dumps(made)) == real and copy.deepcopy(made) == real
    if ip.version == 6:
        assert made_ip.scope_id is None and made_ip.ipv4_mapped == real_ip.ipv4_mapped


def test_host_batches_use_the_cache_s_key_scheme() -> None:
    assert allowmap.V6_KEY == ipkey.V6
    assert allowmap.host_key_network(ipkey.key("2001:db8::1")) == ipaddress.ip_network("2001:db8::1")
