"""fqdn/learner.py: the learn stage's one-name fast lane writes what ``entry_for`` decides.

``_sync`` computes the entries of IPs one name alone holds per name (``_sole_entries``)
and leaves the rest (several names, static rules covering the IP, names no rule selects,
restored entries) to ``entry_for``. Whatever the order of answers, every IP learned must have in
the map exactly the entry ``entry_for`` gives, and ``learn`` must report exactly those.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqdnproxy.datapath.allowmap import AllowEntry, InMemoryAllowMap
from fqdnproxy.dns import wire
from fqdnproxy.exchange import AllowedIp, Client, Decision, Exchange
from fqdnproxy import ipkey
from fqdnproxy.fqdn import learner as learner_mod
from fqdnproxy.fqdn.cache import RESTORED, CacheLimits, FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner, LearnSettings
from fqdnproxy.policy.reload import PolicyStore

S = 1_000_000_000
NOW = 1_000 * S
WALL = 1_700_000_000.0

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: demo}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
    - toEndpoints:
        - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchPattern: "*"}]
    - toCIDRSet:
        - cidr: 192.0.2.0/24
          except: [192.0.2.128/25]
        - cidr: 2001:db8::/64
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
    - toCIDR: [198.51.100.7/32]
      toPorts:
        - ports: [{port: "22", protocol: TCP}]
    - toFQDNs: [{matchPattern: "*.a.test"}, {matchPattern: "*.v6.test"}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
    - toFQDNs: [{matchName: b.a.test}]
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
  egressDeny:
    - toCIDR: [192.0.2.64/26]
"""

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["198.51.100.10"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["198.51.100.53"]}
"""

NAMES = ["x.a.test.", "b.a.test.", "y.v6.test.", "unselected.test."]
POOL = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "192.0.2.10", "192.0.2.70", "192.0.2.200",
        "198.51.100.7", "2001:db8::5", "2001:db8:1::5", "2001:db8:1::6", "::ffff:203.0.113.1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PolicyStore:
    tmp: Path = tmp_path_factory.mktemp("learner")
    (tmp / "p").mkdir()
    (tmp / "p" / "web.yaml").write_text(POLICY)
    (tmp / "endpoints.yaml").write_text(INVENTORY)
    store = PolicyStore(tmp / "p", tmp / "endpoints.yaml")
    store.load()
    return store


def _exchange(store: PolicyStore, name: str) -> Exchange:
    endpoint = store.current.registry.by_id(1)
    policy = store.current.engine.for_endpoint(endpoint)
    query = wire.Query(wire.Header(7, 0x0100, 1, 0, 0, 0), wire.Question(name, 1, 1), 0)
    return Exchange(Client("198.51.100.10", 4000, "udp", ("198.51.100.53", 53)), b"", query,
                    time.monotonic(), ("198.51.100.53", 53),
                    Decision(True, "ok", endpoint=endpoint, policy=policy))


def _response(name: str, addresses: list[tuple[str, int]]) -> wire.Response:
    found = tuple(wire.address(ip, ttl) for ip, ttl in addresses)
    return wire.Response(wire.Header(7, 0x8180, 1, len(found), 0, 0), wire.Question(name, 1, 1),
                         (), (), found)


def _learner(store: PolicyStore, writer: InMemoryAllowMap, clock: list[int],
             limits: CacheLimits | None = None) -> AllowLearner:
    policy = store.current.engine.for_endpoint(store.current.registry.by_id(1))
    return AllowLearner(FqdnCache(limits or CacheLimits()), writer, lambda _: policy,
                        LearnSettings(min_ttl=60), clock=lambda: clock[0], wall=lambda: WALL)


answers_st = st.lists(
    st.tuples(st.sampled_from(NAMES),
              st.lists(st.tuples(st.sampled_from(POOL), st.sampled_from([0, 30, 300, 3600])),
                       min_size=1, max_size=8),
              st.integers(0, 400)),
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers_st)
def test_every_learned_ip_holds_what_entry_for_decides(store: PolicyStore, answers) -> None:
    writer = InMemoryAllowMap()
    clock = [NOW]
    learner = _learner(store, writer, clock, CacheLimits(max_ips_per_name=6))  # caps evict too
    policy = learner._policy_for(1)
    seen: set[str] = set()
    for name, addresses, advance in answers:
        clock[0] += advance * S
        response = _response(name, addresses)
        allowed = learner.learn(_exchange(store, name), response)
        # What learn reports: each answered address with an entry, in answer order, once.
        reported = {a.ip: a for a in allowed}
        assert [a.ip for a in allowed] == [a.ip for a in response.addresses if a.ip in reported]
        for ip, item in reported.items():
            entry = writer.lookup(AllowEntry(1, ipaddress.ip_network(ip)).key)
            assert entry is not None
            assert item == AllowedIp(ip, entry.expiry_ns / S + (WALL - clock[0] / S),
                                     learner_mod.describe_ports(entry.ports))
        seen.update(a.ip for a in response.addresses)
        for ip in seen:
            want = learner.entry_for(policy, 1, ip)
            if want is None and learner.cache.holders(1, ip):
                continue  # held, but no entry: nothing was written, or the answer skipped a delete
            have = writer.lookup(AllowEntry(1, ipaddress.ip_network(ip)).key)
            if want is None:
                assert have is None or not learner.cache.holders(1, ip), ip
            else:
                assert have == want, ip


def test_the_fast_lane_and_entry_for_agree_key_by_key(store: PolicyStore) -> None:
    writer = InMemoryAllowMap()
    learner = _learner(store, writer, [NOW])
    policy = learner._policy_for(1)
    learner.learn(_exchange(store, "x.a.test."), _response("x.a.test.", [(ip, 300) for ip in POOL]))
    learner.learn(_exchange(store, "b.a.test."), _response("b.a.test.", [(POOL[0], 3600)]))
    keys = {ipkey.key(ip) for ip in POOL}
    written = learner._sync(policy, 1, keys).entries()
    for k in keys:
        assert written.get(k) == learner._entry_for_key(policy, 1, k), ipkey.text(k)
    # The shared IP goes the long way; the rest, one name each, the fast one (which hands the
    # statically covered ones on to entry_for in turn).
    sole, rest = learner.cache.sole_holders_keys(1, keys)
    assert set(rest) == {ipkey.key(POOL[0])}
    assert set(sole["x.a.test."]) == keys - {ipkey.key(POOL[0])}


def test_restored_entries_keep_their_ports(store: PolicyStore) -> None:
    writer = InMemoryAllowMap()
    learner = _learner(store, writer, [NOW])
    policy = learner._policy_for(1)
    restored = AllowEntry(1, "203.0.113.9/32", NOW + 60 * S, (learner_mod.PortRange(6, 25, 25),))
    learner.keep_restored(restored)
    learner.cache.learn(1, RESTORED, [("203.0.113.9", restored.expiry_ns)])
    assert learner.sync(policy, 1, ["203.0.113.9"]) == {"203.0.113.9": restored}


def test_allowed_ip_fast_builder_equals_the_constructor() -> None:
    made = learner_mod._allowed_ip("192.0.2.1", 1.5, "tcp/443")
    assert made == AllowedIp("192.0.2.1", 1.5, "tcp/443") and type(made) is AllowedIp
    assert hash(made) == hash(AllowedIp("192.0.2.1", 1.5, "tcp/443"))


def test_without_an_audit_log_learn_writes_the_same_entries_and_reports_none(
        store: PolicyStore) -> None:
    answers = [("x.a.test.", [(ip, 300) for ip in POOL]), ("b.a.test.", [(POOL[0], 3600)])]
    maps = []
    for report in (True, False):
        writer = InMemoryAllowMap()
        policy = store.current.engine.for_endpoint(store.current.registry.by_id(1))
        learner = AllowLearner(FqdnCache(CacheLimits()), writer, lambda _: policy,
                               LearnSettings(min_ttl=60, report_allowed=report),
                               clock=lambda: NOW, wall=lambda: WALL)
        reported = [learner.learn(_exchange(store, name), _response(name, addresses))
                    for name, addresses in answers]
        assert all(reported) if report else reported == [(), ()]
        maps.append({ip: writer.lookup(AllowEntry(1, ipaddress.ip_network(ip)).key)
                     for ip in POOL})
    assert maps[0] == maps[1]
    assert any(entry is not None for entry in maps[1].values())
