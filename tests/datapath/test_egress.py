"""Root tests of the egress program on real veths: verdicts, expiry, ports, IPv6, spoofing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fqdnproxy.datapath import attach as tc
from fqdnproxy.datapath import egress, pinned
from fqdnproxy.datapath.allowmap import AllowEntry, AllowKey, PortRange, kernel_now_ns
from fqdnproxy.datapath.maps import EndpointFlags, Reason
from tests.datapath import topology as topo

pytestmark = pytest.mark.root

ENFORCE = EndpointFlags.ENFORCE_EGRESS
TCP, UDP = 6, 17
EP1, EP2 = 101, 102


@pytest.fixture(scope="module")
def net() -> Iterator[topo.Topology]:
    with topo.topology() as t:
        yield t


@pytest.fixture(scope="module")
def loaded(bpffs: Path, net: topo.Topology) -> Iterator[egress.EgressDatapath]:
    dp = egress.EgressDatapath.load(bpffs / "fqdnproxy-test-egress", egress.Options(events_per_sec=5),
                                    bpffs=bpffs)
    try:
        for pod in (net.pod1, net.pod2):
            dp.attach(pod.host_if, netns=net.node)
        yield dp
    finally:
        dp.close()


@pytest.fixture
def dp(loaded: egress.EgressDatapath, net: topo.Topology) -> egress.EgressDatapath:
    """The loaded datapath with pod1 enforced and pod2 unknown, and no allow entries or flows."""
    m = loaded.maps
    m.delete_allows([e.key for e in m.dump()])
    for address, _ in m.endpoints():
        m.remove_endpoint(address)
    pinned.clear_flows(m)
    ifindex = net.ifindex(net.pod1)
    for ip in (net.pod1.ip, net.pod1.ip6):
        loaded.set_endpoint(ip, EP1, ENFORCE, ifindex)
    loaded.drop_events().poll(0)
    return loaded


def allow(endpoint: int, dest: str, *ports: str, expiry_ns: int = 0) -> AllowEntry:
    ranges = tuple(PortRange.parse(p) for p in ports) or (PortRange(),)
    return AllowEntry(endpoint, dest, expiry_ns, ranges)


def test_allowed_and_denied(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    dp.upsert_allows([allow(EP1, "203.0.113.5/32", "tcp/8080", "udp/9000")])
    before = dp.counters().get(EP1, {})
    assert net.probe(net.pod1, "tcp,203.0.113.5,8080", "udp,203.0.113.5,9000",
                     "tcp,203.0.113.6,8080", "udp,203.0.113.6,9000") == [True, True, False, False]
    after = dp.counters()[EP1]
    assert after[Reason.PASS_ALLOWED] - before.get(Reason.PASS_ALLOWED, 0) == 2
    assert after[Reason.DROP_NO_ENTRY] - before.get(Reason.DROP_NO_ENTRY, 0) >= 2
    events = dp.drop_events().poll(100)
    assert {(str(e.destination), e.dport, e.reason) for e in events} >= {
        ("203.0.113.6", 8080, Reason.DROP_NO_ENTRY), ("203.0.113.6", 9000, Reason.DROP_NO_ENTRY)}
    assert all(e.endpoint_id == EP1 for e in events), events


def test_unknown_unenforced_and_audit_pass(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    assert net.probe(net.pod2, "tcp,203.0.113.5,8080") == [True]  # pod2 is not an endpoint
    dp.set_endpoint(net.pod2.ip, EP2, EndpointFlags.NONE, net.ifindex(net.pod2))
    assert net.probe(net.pod2, "tcp,203.0.113.5,8080") == [True]
    assert dp.counters()[EP2][Reason.PASS_UNENFORCED] >= 1
    dp.set_endpoint(net.pod2.ip, EP2, ENFORCE | EndpointFlags.AUDIT, net.ifindex(net.pod2))
    assert net.probe(net.pod2, "udp,203.0.113.5,9000") == [True]
    assert dp.counters()[EP2][Reason.AUDITED] >= 1
    events = dp.drop_events().poll(100)
    assert any(e.audited and e.endpoint_id == EP2 and e.reason == Reason.DROP_NO_ENTRY for e in events)


def test_dns_to_the_proxy_passes(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    assert net.probe(net.pod1, "udp,203.0.113.9,53") == [False]
    dp.set_dns_target("203.0.113.9", 53)
    try:
        assert net.probe(net.pod1, "udp,203.0.113.9,53", "tcp,203.0.113.9,53",
                         "udp,203.0.113.8,53") == [True, True, False]
        assert dp.counters()[EP1][Reason.PASS_DNS] >= 2
    finally:
        dp.maps.remove_dns_target("203.0.113.9", 53)


def test_port_and_protocol_restrictions(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    dp.upsert_allows([allow(EP1, "203.0.113.5/32", "tcp/8080")])
    assert net.probe(net.pod1, "tcp,203.0.113.5,8080", "tcp,203.0.113.5,8081",
                     "udp,203.0.113.5,8080") == [True, False, False]
    assert dp.counters()[EP1][Reason.DROP_PORT] >= 2


def test_expiry_drops_new_flows_but_not_established(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    ttl_ns = 1_500_000_000
    dp.upsert_allows([allow(EP1, "203.0.113.5/32", "tcp/8080", expiry_ns=kernel_now_ns() + ttl_ns)])
    session = subprocess.Popen(
        ["ip", "netns", "exec", net.pod1.ns, sys.executable, topo.PEER, "session", "203.0.113.5", "8080"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert session.stdout.readline().strip() == "connected"
        assert net.probe(net.pod1, "tcp,203.0.113.5,8080") == [True]
        time.sleep(ttl_ns / 1e9)  # the kernel clock must pass the expiry: waiting is the test
        assert net.probe(net.pod1, "tcp,203.0.113.5,8080") == [False]
        assert dp.counters()[EP1][Reason.DROP_EXPIRED] >= 1
        session.stdin.write("ping\n")
        session.stdin.flush()
        assert session.stdout.readline().strip() == "ok"
    finally:
        session.kill()
        session.wait()
    assert dp.gc(kernel_now_ns()) == 1
    assert dp.dump() == []
    assert dp.metrics.gc_deleted._value.get() >= 1


def test_fqdn_entry_inside_a_cidr_entry(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    """DESIGN merge rule: a /32 never narrows the broader rule; expired, the CIDR still applies."""
    now = kernel_now_ns()
    dp.upsert_allows([
        allow(EP1, "203.0.113.0/24", "udp/9000"),
        allow(EP1, "203.0.113.5/32", "tcp/8080", expiry_ns=now + 1_000_000_000),
    ])
    assert net.probe(net.pod1, "tcp,203.0.113.5,8080", "udp,203.0.113.5,9000",
                     "udp,203.0.113.6,9000", "tcp,203.0.113.6,8080") == [True, True, True, False]
    time.sleep(1.0)  # let the /32 expire
    pinned.clear_flows(dp.maps)
    assert net.probe(net.pod1, "tcp,203.0.113.5,8080", "udp,203.0.113.5,9000") == [False, True]


def test_ipv6(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    dp.upsert_allows([allow(EP1, "2001:db8:ff::1/128", "tcp/8080"), allow(EP1, "2001:db8:ff::/126", "udp/9000")])
    assert net.probe(net.pod1, "tcp,2001:db8:ff::1,8080", "udp,2001:db8:ff::2,9000",
                     "tcp,2001:db8:ff::2,8080", "tcp,2001:db8:ff::1,8081") == [True, True, False, False]
    assert {e.source.version for e in dp.drop_events().poll(100)} == {6}


def test_icmp_and_fragments(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    assert net.probe(net.pod1, "icmp,203.0.113.5", "udp,203.0.113.5,9000,4000") == [False, False]
    dp.upsert_allows([allow(EP1, "203.0.113.5/32", "icmp", "udp/9000")])
    # 4000 bytes over a 1500 MTU: the first fragment is judged with ports, the rest by address.
    assert net.probe(net.pod1, "icmp,203.0.113.5", "udp,203.0.113.5,9000,4000") == [True, True]


def test_spoofed_source_from_another_pod(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    from pyroute2 import NetNS

    dp.upsert_allows([allow(EP1, "203.0.113.5/32", "udp/9000")])
    dp.set_endpoint(net.pod2.ip, EP2, ENFORCE, net.ifindex(net.pod2))
    before = dp.counters().get(EP1, {}).get(Reason.DROP_SPOOFED, 0)
    with NetNS(net.pod2.ns) as ns:  # pod2 claims pod1's address, inside pod2's namespace only
        ns.addr("add", index=ns.link_lookup(ifname="eth0")[0], address=net.pod1.ip, prefixlen=32)
    try:
        script = ("import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                  f"s.bind(('{net.pod1.ip}',0));s.sendto(b'x',('203.0.113.5',9000))")
        subprocess.run(["ip", "netns", "exec", net.pod2.ns, sys.executable, "-c", script], check=True)
    finally:
        with NetNS(net.pod2.ns) as ns:
            ns.addr("del", index=ns.link_lookup(ifname="eth0")[0], address=net.pod1.ip, prefixlen=32)
    assert dp.counters()[EP1][Reason.DROP_SPOOFED] > before
    # An unknown source on an enforced endpoint's interface is spoofed too (pod2's IPv6
    # address is not registered, but its interface is).
    assert dp.remove_endpoint(net.pod2.ip6) is False
    script = ("import socket;s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);"
              "s.sendto(b'x',('2001:db8:ff::1',9000))")
    subprocess.run(["ip", "netns", "exec", net.pod2.ns, sys.executable, "-c", script], check=True)
    assert dp.counters()[EP2][Reason.DROP_SPOOFED] >= 1


def test_drop_events_are_rate_limited(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    dp.drop_events().poll(0)
    before = dp.counters()[EP1].get(Reason.EVENT_SUPPRESSED, 0)
    script = ("import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "for i in range(40): s.sendto(b'x',('203.0.113.7',9000+i))")
    subprocess.run(["ip", "netns", "exec", net.pod1.ns, sys.executable, "-c", script], check=True)
    events = [e for e in dp.drop_events().poll(100) if str(e.destination) == "203.0.113.7"]
    assert 1 <= len(events) <= 5  # Options(events_per_sec=5)
    assert dp.counters()[EP1][Reason.EVENT_SUPPRESSED] - before >= 35


def test_attach_is_idempotent_and_leaves_other_filters(dp: egress.EgressDatapath, net: topo.Topology) -> None:
    from pyroute2 import NetNS

    with NetNS(net.node) as ns:
        index = ns.link_lookup(ifname="wan0")[0]
        ns.tc("add", "clsact", index)
        # Someone else's filter: any bpf program at another priority (ours is handy).
        ns.tc("add-filter", "bpf", index, 7, fd=dp.prog_fd, name="other", parent=tc.TC_H_CLSACT_INGRESS,
              prio=7, protocol=tc.ETH_P_ALL, direct_action=True)
    for _ in range(2):
        dp.attach("wan0", netns=net.node)
    ours = [f for f in tc.attached("wan0", net.node) if f["prio"] == tc.FILTER_PRIO]
    assert len(ours) == 1
    assert dp.detach("wan0", netns=net.node) is True
    assert dp.detach("wan0", netns=net.node) is False
    assert [f["prio"] for f in tc.attached("wan0", net.node)] == [7]
    with NetNS(net.node) as ns:
        ns.tc("del-filter", "bpf", index, 7, parent=tc.TC_H_CLSACT_INGRESS, prio=7, protocol=tc.ETH_P_ALL)


def test_batched_upsert_lookup_delete(dp: egress.EgressDatapath) -> None:
    import ipaddress

    base = int(ipaddress.IPv4Address("10.0.0.0"))
    entries = [AllowEntry(EP2, ipaddress.ip_network(ipaddress.IPv4Address(base + i)), 0,
                          (PortRange(6, 443, 443),)) for i in range(50_000)]
    started = time.monotonic()
    dp.upsert_allows(entries)
    assert time.monotonic() - started < 10
    assert dp.lookup(entries[12345].key) == entries[12345]
    assert len(dp.dump()) == 50_000
    assert dp.delete_allows([e.key for e in entries[:10]] + [AllowKey(EP2, entries[0].network)]) == 10
    assert dp.lookup(entries[0].key) is None


def test_a_host_batch_reads_back_as_its_entries(dp: egress.EgressDatapath) -> None:
    from fqdnproxy.datapath.allowmap import HostAllows
    from fqdnproxy import ipkey

    ips = ["198.51.100.31", "198.51.100.32", "2001:db8:31::1"]
    batch = HostAllows(EP2, (PortRange(6, 443, 443), PortRange(17, 53, 53)),
                       [ipkey.key(ip) for ip in ips], [kernel_now_ns() + 60 * 10**9] * 2 + [7])
    dp.upsert_hosts(batch)
    try:
        assert [dp.lookup(e.key) for e in batch.entries()] == batch.entries()
    finally:
        dp.delete_allows([e.key for e in batch.entries()])
