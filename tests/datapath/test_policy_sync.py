"""datapath/policy_sync.py: static entries from policies, checked with the kernel's matching rule
(longest prefix; an exact entry that is expired or misses the port falls through)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fqdnproxy.datapath import policy_sync
from fqdnproxy.datapath.allowmap import InMemoryAllowMap, kernel_now_ns
from fqdnproxy.datapath.maps import EndpointFlags
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner
from fqdnproxy.policy.reload import PolicyStore

S = 1_000_000_000
TCP = 6

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: demo}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
    - toCIDRSet:
        - cidr: 192.0.2.0/24
          except: [192.0.2.128/25]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
    - toCIDR: [198.51.100.7/32]
      toPorts:
        - ports: [{port: "22", protocol: TCP}]
    - toFQDNs: [{matchName: api.test}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
  egressDeny:
    - toCIDR: [192.0.2.64/26]
"""

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["198.51.100.10"],
     interface: veth-web}
  - {namespace: demo, name: free, id: 2, labels: {app: free}, ips: ["198.51.100.11"]}
"""


class RecordingDatapath(InMemoryAllowMap):
    """The allow map with the kernel's matching rule, plus the endpoint and DNS-target state."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[str, tuple[int, int, int]] = {}
        self.dns: set[tuple[str, int]] = set()
        self.attached: list[str] = []
        self.maps = self

    def set_endpoint(self, ip: str, endpoint_id: int, flags: int, ifindex: int = 0) -> None:
        self.endpoints[ip] = (endpoint_id, flags, ifindex)

    def remove_endpoint(self, ip: str) -> bool:
        return self.endpoints.pop(ip, None) is not None

    def set_dns_target(self, ip: str, port: int = 53) -> None:
        self.dns.add((ip, port))

    def remove_dns_target(self, ip: str, port: int = 53) -> None:
        self.dns.discard((ip, port))

    def attach(self, name: str) -> int:
        self.attached.append(name)
        return 1


@pytest.fixture
def store(tmp_path: Path) -> PolicyStore:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "web.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    store = PolicyStore(tmp_path / "p", tmp_path / "endpoints.yaml")
    store.load()
    return store


def _sync(store: PolicyStore, dp: RecordingDatapath, learner: AllowLearner,
          previous: policy_sync.DesiredState | None = None) -> policy_sync.DesiredState:
    snap = store.current
    desired = policy_sync.desired_state(snap.engine, snap.registry, learner.entry_for,
                                        [("198.51.100.53", 53)],
                                        ifindex_of=lambda name: 7 if name == "veth-web" else 0)
    policy_sync.apply(dp, desired, previous)
    return desired


def _learner(store: PolicyStore, dp: RecordingDatapath) -> AllowLearner:
    def policy_for(endpoint_id: int) -> object | None:
        endpoint = store.current.registry.by_id(endpoint_id)
        return store.current.engine.for_endpoint(endpoint) if endpoint else None

    return AllowLearner(FqdnCache(), dp, policy_for)


@pytest.mark.parametrize("destination, port, passes", [
    ("192.0.2.10", 80, True),
    ("192.0.2.10", 81, False),
    ("192.0.2.70", 80, False),  # egressDeny /26 inside the allowed /24: the deny wins
    ("192.0.2.200", 80, False),  # the except
    ("198.51.100.7", 22, True),  # an exact static rule
    ("198.51.100.7", 443, False),
    ("203.0.113.9", 80, False),
])
def test_static_entries_follow_the_rules(store: PolicyStore, destination: str, port: int,
                                         passes: bool) -> None:
    dp = RecordingDatapath()
    _sync(store, dp, _learner(store, dp))
    assert dp.admits(1, destination, TCP, port, kernel_now_ns()) is passes


def test_endpoints_dns_targets_and_interfaces(store: PolicyStore) -> None:
    dp = RecordingDatapath()
    _sync(store, dp, _learner(store, dp))
    assert dp.endpoints == {"198.51.100.10": (1, int(EndpointFlags.ENFORCE_EGRESS), 7),
                            "198.51.100.11": (2, 0, 0)}
    assert dp.dns == {("198.51.100.53", 53)} and dp.attached == ["veth-web"]


def test_learned_and_static_share_an_exact_key(store: PolicyStore) -> None:
    dp = RecordingDatapath()
    learner = _learner(store, dp)
    _sync(store, dp, learner)
    now = kernel_now_ns()
    learner.cache.learn(1, "api.test.", [("198.51.100.7", now + 60 * S), ("192.0.2.70", now + 60 * S)])
    learner.sync(learner._policy_for(1), 1, ["198.51.100.7", "192.0.2.70"])
    assert dp.admits(1, "198.51.100.7", TCP, 443, now) and dp.admits(1, "198.51.100.7", TCP, 22, now)
    assert not dp.admits(1, "192.0.2.70", TCP, 443, now)  # learned, but inside the deny
    learner.collect_garbage(now + 61 * S, 100)  # the learned part expires ...
    assert dp.admits(1, "198.51.100.7", TCP, 22, now + 61 * S)  # ... the static part stays
    assert not dp.admits(1, "198.51.100.7", TCP, 443, now + 61 * S)


def test_apply_writes_only_the_difference(store: PolicyStore, tmp_path: Path) -> None:
    dp = RecordingDatapath()
    learner = _learner(store, dp)
    first = _sync(store, dp, learner)
    policy = tmp_path / "p" / "web.yaml"
    policy.write_text(policy.read_text().replace("  egressDeny:\n    - toCIDR: [192.0.2.64/26]\n", ""))
    assert store.check_for_changes().status == "reloaded"
    snap = store.current
    desired = policy_sync.desired_state(snap.engine, snap.registry, learner.entry_for,
                                        [("198.51.100.53", 53)], ifindex_of=lambda name: 7)
    applied = policy_sync.apply(dp, desired, first)
    assert applied.entries_deleted == 1 and applied.attached == ()
    assert dp.admits(1, "192.0.2.70", TCP, 80, kernel_now_ns())
