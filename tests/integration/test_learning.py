"""The learning loop on loopback: policy decides, answers teach the in-memory allow map.

Clients are endpoints of the inventory with loopback addresses (127.0.0.2, ...), the proxy
listens on 127.0.0.1 (the inventory's kube-dns service), and the upstream is the controllable
dnslib server. The kernel map is exercised by the root tests; here the allow map is the
in-memory implementation, which follows the same contract.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import EDNS0, DNSRecord

from fqdnproxy import proxy as proxy_mod
from fqdnproxy.datapath.allowmap import AllowEntry, AllowKey, InMemoryAllowMap, kernel_now_ns
from fqdnproxy.dns import server as server_mod
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.dns import wire
from fqdnproxy.fqdn.cache import CacheLimits, FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner, LearnSettings
from fqdnproxy.observe.metrics import Metrics
from fqdnproxy.policy.decider import PolicyDecider
from fqdnproxy.policy.reload import PolicyStore
from tests.conftest import require
from tests.support.audit_schema import RecordingAudit
from tests.support.bpffs import private_bpffs
from tests.support.dns_client import udp_query
from tests.support.fake_upstream import FakeUpstream
from tests.support.policies import web_policy

S = 1_000_000_000
WEB1, WEB2, LONE, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"

def policy(port: int) -> str:
    """Names the tests look up, a CIDR to merge, DNS to kube-dns (the proxy, on ``port``)."""
    selectors = ['matchPattern: "*.allowed.test"', "matchName: chain.test", "matchName: zero.test",
                 "matchName: many.test"]
    cidr = ("    - toCIDRSet:\n        - cidr: 192.0.2.0/24\n      toPorts:\n"
            '        - ports: [{port: "8080", protocol: TCP}]\n')
    return web_policy([*selectors, "matchName: unselected.test"], selectors, dns_port=port,
                      extra=cidr)

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web1, id: 1, labels: {app: web}, ips: ["127.0.0.2"]}
  - {namespace: demo, name: web2, id: 2, labels: {app: web}, ips: ["127.0.0.3"]}
  - {namespace: demo, name: lone, id: 3, labels: {app: other}, ips: ["127.0.0.4"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["127.0.0.1"]}
"""


class FullAllowMap(InMemoryAllowMap):
    """The allow map when the kernel refuses more entries (E2BIG from a full map)."""

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        if entries:
            raise OSError(7, "Argument list too long (map full)")


@dataclass
class Rig:
    upstream: FakeUpstream
    server: server_mod.DnsServer
    client: upstream_mod.UpstreamClient
    allow_map: InMemoryAllowMap
    cache: FqdnCache
    learner: AllowLearner
    store: PolicyStore
    audit: RecordingAudit
    address: tuple[str, int]
    policy_dir: Path

    def entry(self, endpoint_id: int, ip: str) -> AllowEntry | None:
        return self.allow_map.lookup(AllowKey(endpoint_id, ipaddress.ip_network(ip)))

    async def ask(self, name: str, source: str, qtype: str = "A") -> DNSRecord:
        answer = await udp_query(self.address, DNSRecord.question(name, qtype), source=source)
        assert answer is not None
        return answer


async def make_rig(tmp_path: Path, *, allow_map: InMemoryAllowMap | None = None,
                   limits: CacheLimits = CacheLimits(),
                   deny_rcode: wire.Rcode = wire.Rcode.REFUSED) -> Rig:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    store = PolicyStore(policy_dir, tmp_path / "endpoints.yaml")
    upstream = await FakeUpstream().start()
    metrics = Metrics()
    audit = RecordingAudit()
    client = upstream_mod.UpstreamClient(upstream_mod.UpstreamSettings(timeout=1.0), metrics)
    await client.start()
    allow_map = allow_map if allow_map is not None else InMemoryAllowMap()
    cache = FqdnCache(limits)

    def policy_for(endpoint_id: int) -> object | None:
        snapshot = store.current
        endpoint = snapshot.registry.by_id(endpoint_id)
        return snapshot.engine.for_endpoint(endpoint) if endpoint is not None else None

    learner = AllowLearner(cache, allow_map, policy_for, LearnSettings(min_ttl=60))
    proxy = proxy_mod.Proxy(client, proxy_mod.RoundRobinUpstreams([upstream.address]), audit,
                            metrics, proxy_mod.ProxySettings(deny_rcode=deny_rcode),
                            decider=PolicyDecider(lambda: store.current), learner=learner)
    server = server_mod.DnsServer([("127.0.0.1", 0)], proxy.handle, metrics,
                                  server_mod.ListenerLimits(), receive=proxy.receive)
    await server.start()
    port = server.bound[0][2]  # the policy names the port the kernel gave the proxy
    (policy_dir / "web.yaml").write_text(policy(port))
    store.load()
    return Rig(upstream, server, client, allow_map, cache, learner, store, audit,
               ("127.0.0.1", port), policy_dir)


@pytest.fixture(scope="module")
def kernel_map(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real allow map: the eBPF program loaded, its maps pinned on a private bpffs."""
    import os

    require(os.geteuid() == 0, "the kernel allow map needs root and BPF")
    from fqdnproxy.datapath.egress import EgressDatapath

    with private_bpffs(tmp_path_factory.mktemp("bpffs")) as mount:
        datapath = EgressDatapath.load(mount / "fqdnproxy-test")
        try:
            yield datapath
        finally:
            datapath.close()


@pytest.fixture(params=["memory", "kernel"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig with the in-memory allow map, and again with the kernel's (root)."""
    allow_map = None
    if request.param == "kernel":
        allow_map = request.getfixturevalue("kernel_map")
        allow_map.delete_allows([entry.key for entry in allow_map.dump()])  # a clean map
    rig = await make_rig(tmp_path, allow_map=allow_map)
    yield rig
    await close(rig)


async def close(rig: Rig) -> None:
    await rig.server.stop()
    await rig.client.close()
    await rig.upstream.stop()


async def test_allowed_answer_is_in_the_map_before_release(rig: Rig) -> None:
    rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
    before = kernel_now_ns()
    answer = await rig.ask("api.allowed.test", WEB1)
    assert answer.header.rcode == 0 and str(answer.rr[0].rdata) == "203.0.113.10"
    entry = rig.entry(1, "203.0.113.10")
    assert entry is not None and [str(p) for p in entry.ports] == ["tcp/443"]
    # The TTL, plus the 10 % headroom (cache.ttl_headroom) that spares repeat lookups a write.
    assert before + 330 * S <= entry.expiry_ns <= kernel_now_ns() + 330 * S
    record = rig.audit.records[-1]
    assert record.verdict == "allowed" and record.endpoint["name"] == "web1"
    assert [(a.ip, a.ports) for a in record.allowed_ips] == [("203.0.113.10", "tcp/443")]
    assert "rules.dns" in record.reason and "web.yaml" in record.reason


async def test_denied_query_is_refused_and_teaches_nothing(rig: Rig) -> None:
    answer = await rig.ask("other.test", WEB1)
    assert answer.header.rcode == wire.Rcode.REFUSED and not answer.rr
    assert not rig.upstream.received and not rig.allow_map.dump()
    record = rig.audit.records[-1]
    assert record.verdict == "denied" and record.reason == "no rule allows"


async def test_nxdomain_mode(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, deny_rcode=wire.Rcode.NXDOMAIN)
    try:
        assert (await rig.ask("other.test", WEB1)).header.rcode == wire.Rcode.NXDOMAIN
    finally:
        await close(rig)


async def test_unknown_source_gets_servfail(rig: Rig) -> None:
    assert (await rig.ask("api.allowed.test", STRANGER)).header.rcode == wire.Rcode.SERVFAIL
    assert rig.audit.records[-1].verdict == "no-endpoint"
    assert not rig.upstream.received


async def test_cname_chain_takes_the_smallest_ttl_on_the_chain(rig: Rig) -> None:
    rig.upstream.add("chain.test. 30 IN CNAME edge.cdn.example.",
                     "edge.cdn.example. 300 IN A 203.0.113.20")
    now = kernel_now_ns()
    await rig.ask("chain.test", WEB1)
    entry = rig.entry(1, "203.0.113.20")
    assert entry is not None
    # 30 s on the chain, floored at 60, plus 10 % headroom
    assert now + 66 * S <= entry.expiry_ns < now + 67 * S
    assert rig.audit.records[-1].cnames == ("edge.cdn.example.",)


async def test_ttl_zero_is_floored_at_min_ttl(rig: Rig) -> None:
    rig.upstream.add("zero.test. 0 IN A 203.0.113.30")
    now = kernel_now_ns()
    await rig.ask("zero.test", WEB1)
    entry = rig.entry(1, "203.0.113.30")
    assert entry is not None and entry.expiry_ns >= now + 60 * S


async def test_hundred_ip_answer_writes_a_hundred_entries(rig: Rig) -> None:
    rig.upstream.add(*(f"many.test. 120 IN A 198.51.100.{i}" for i in range(1, 101)))
    request = DNSRecord.question("many.test")
    request.add_ar(EDNS0(udp_len=4096))
    answer = await udp_query(rig.address, request, source=WEB1)
    assert answer is not None and len(answer.rr) == 100
    assert len(rig.allow_map.dump()) == 100


async def test_per_name_cap_evicts_and_the_map_follows(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, limits=CacheLimits(max_ips_per_name=10))
    try:
        rig.upstream.add(*(f"many.test. 120 IN A 198.51.100.{i}" for i in range(1, 31)))
        request = DNSRecord.question("many.test")
        request.add_ar(EDNS0(udp_len=4096))
        assert await udp_query(rig.address, request, source=WEB1) is not None
        assert len(rig.cache) == 10 and len(rig.allow_map.dump()) == 10
        assert rig.cache.evictions["ips_per_name"] == 20
    finally:
        await close(rig)


async def test_endpoints_are_isolated(rig: Rig) -> None:
    rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
    await rig.ask("api.allowed.test", WEB1)
    assert rig.entry(1, "203.0.113.10") is not None
    assert rig.entry(2, "203.0.113.10") is None  # same policy, but web2 never looked it up


async def test_allowed_but_unselected_name_is_answered_without_an_entry(rig: Rig) -> None:
    rig.upstream.add("unselected.test. 300 IN A 203.0.113.40")
    assert (await rig.ask("unselected.test", WEB1)).rr
    assert rig.entry(1, "203.0.113.40") is None
    assert rig.cache.ips(1, "unselected.test.")  # cached, for a policy that may select it later


async def test_unenforced_endpoint_is_forwarded_without_entries(rig: Rig) -> None:
    assert (await rig.ask("anything.example", LONE)).rr
    assert rig.audit.records[-1].verdict == "allowed" and not rig.allow_map.dump()


async def test_cidr_ports_merge_into_a_learned_ip_inside_the_cidr(rig: Rig) -> None:
    rig.upstream.add("web.allowed.test. 300 IN A 192.0.2.80")
    await rig.ask("web.allowed.test", WEB1)
    entry = rig.entry(1, "192.0.2.80")
    assert entry is not None and sorted(str(p) for p in entry.ports) == ["tcp/443", "tcp/8080"]


async def test_map_full_gives_servfail_with_the_reason(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, allow_map=FullAllowMap())
    try:
        answer = await rig.ask("api.allowed.test", WEB1)
        assert answer.header.rcode == wire.Rcode.SERVFAIL and not answer.rr
        record = rig.audit.records[-1]
        assert record.rcode == "SERVFAIL" and "map full" in record.reason
    finally:
        await close(rig)


async def test_reload_reevaluates_cached_names_and_removed_endpoints(rig: Rig) -> None:
    rig.upstream.add("unselected.test. 300 IN A 203.0.113.40",
                     "api.allowed.test. 300 IN A 203.0.113.10")
    await rig.ask("unselected.test", WEB1)
    await rig.ask("api.allowed.test", WEB2)
    assert rig.entry(1, "203.0.113.40") is None
    policy = rig.policy_dir / "web.yaml"
    policy.write_text(policy.read_text().replace(
        "        - matchName: many.test\n      toPorts",
        "        - matchName: many.test\n        - matchName: unselected.test\n      toPorts"))
    inventory = rig.store  # web2 leaves the inventory
    endpoints_file = rig.policy_dir.parent / "endpoints.yaml"
    endpoints_file.write_text(INVENTORY.replace(
        '  - {namespace: demo, name: web2, id: 2, labels: {app: web}, ips: ["127.0.0.3"]}\n', ""))
    result = inventory.check_for_changes()
    assert result.status == "reloaded", result.errors
    rig.learner.reevaluate()
    assert rig.entry(1, "203.0.113.40") is not None  # newly selected: allowed at once
    assert rig.entry(2, "203.0.113.10") is None  # endpoint removed: everything gone
    assert rig.cache.endpoint_ids() == [1]


async def test_garbage_collection_deletes_expired_entries(rig: Rig) -> None:
    rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
    await rig.ask("api.allowed.test", WEB1)
    assert rig.learner.collect_garbage(kernel_now_ns(), 100) == 0
    assert rig.learner.collect_garbage(kernel_now_ns() + 301 * S, 100) == 0  # headroom
    assert rig.learner.collect_garbage(kernel_now_ns() + 331 * S, 100) == 1
    assert not rig.allow_map.dump() and len(rig.cache) == 0



async def test_concurrent_lookups_never_release_before_their_ips_are_written(rig: Rig) -> None:
    # Each answer carries different addresses (a rotating upstream); every answer a client
    # receives must already have all of its addresses in the map.
    for i in range(1, 31):
        rig.upstream.add(f"spin.allowed.test. 300 IN A 198.51.100.{i}")
    import asyncio
    import random

    def rotate(request: DNSRecord, protocol: str, original=rig.upstream.answer_for) -> DNSRecord:
        reply = original(request, protocol)
        keep = random.sample(list(reply.rr), 3)
        reply.rr = keep
        return reply

    rig.upstream.answer_for = rotate  # type: ignore[method-assign]

    async def ask_and_check() -> int:
        answer = await rig.ask("spin.allowed.test", WEB1)
        # Checked the moment the answer arrives, before anything else can run.
        return sum(rig.entry(1, str(rr.rdata)) is not None for rr in answer.rr)

    assert await asyncio.gather(*(ask_and_check() for _ in range(25))) == [3] * 25


async def test_repeat_lookups_within_the_headroom_cost_no_map_write(rig: Rig) -> None:
    rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
    await rig.ask("api.allowed.test", WEB1)
    first = rig.entry(1, "203.0.113.10")
    for _ in range(3):
        await rig.ask("api.allowed.test", WEB1)
    assert rig.entry(1, "203.0.113.10") == first  # not rewritten: still covers TTL 300 from now


async def test_a_full_kernel_map_gives_servfail_with_the_reason(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import os

    require(os.geteuid() == 0, "the kernel allow map needs root and BPF")
    from fqdnproxy.datapath.egress import EgressDatapath, Options

    with private_bpffs(tmp_path_factory.mktemp("bpffs-small")) as mount:
        small = EgressDatapath.load(mount / "fqdnproxy-small", Options(allow_max=16))
        try:
            rig = await make_rig(tmp_path, allow_map=small)
            try:
                rig.upstream.add(*(f"many.test. 120 IN A 198.51.100.{i}" for i in range(1, 41)))
                request = DNSRecord.question("many.test")
                request.add_ar(EDNS0(udp_len=4096))
                answer = await udp_query(rig.address, request, source=WEB1)
                assert answer is not None and answer.header.rcode == wire.Rcode.SERVFAIL
                assert "allow map refused" in rig.audit.records[-1].reason
                # The agent goes on: a small answer still fits and is answered.
                rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
                small.delete_allows([e.key for e in small.dump()])
                assert (await rig.ask("api.allowed.test", WEB1)).rr
            finally:
                await close(rig)
        finally:
            small.close()
