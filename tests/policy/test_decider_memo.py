"""The decide stage remembers verdicts per policy snapshot: a repeat is answered from the memo,
a reload (policies or inventory) forgets everything at once, and the memo keeps to its cap."""

from __future__ import annotations

from pathlib import Path

from fqdnproxy.dns import wire
from fqdnproxy.exchange import Client
from fqdnproxy.policy.decider import PolicyDecider
from fqdnproxy.policy.reload import PolicyStore
from tests.support.policies import web_policy

WEB, OTHER, STRANGER = "10.0.0.2", "10.0.0.3", "10.0.0.9"
DNS = ("10.96.0.10", 53)
INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["10.0.0.2"]}
  - {namespace: demo, name: other, id: 2, labels: {app: other}, ips: ["10.0.0.3"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["10.96.0.10"]}
"""


def question(name: str) -> wire.Query:
    return wire.Query(wire.Header(1, 0x0100, 1, 0, 0, 0), wire.Question(name, 1, 1), 0)


def client(ip: str, protocol: str = "udp") -> Client:
    return Client(ip, 40000, protocol, DNS)


def make_store(tmp_path: Path, names: list[str]) -> PolicyStore:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    (tmp_path / "policies" / "web.yaml").write_text(
        web_policy([f"matchName: {n}" for n in names], [f"matchName: {n}" for n in names]))
    store = PolicyStore(tmp_path / "policies", tmp_path / "endpoints.yaml")
    store.load()
    return store


def fresh(store: PolicyStore, ip: str, name: str, protocol: str = "udp"):
    """The verdict of a decider that has never seen the question."""
    return PolicyDecider(lambda: store.current).decide(client(ip, protocol), question(name), DNS)


def test_a_repeat_comes_from_the_memo_and_equals_a_fresh_verdict(tmp_path: Path) -> None:
    store = make_store(tmp_path, ["api.demo.test"])
    decider = PolicyDecider(lambda: store.current)
    cases = [(WEB, "api.demo.test.", "udp"), (WEB, "www.demo.test.", "udp"),
             (WEB, "api.demo.test.", "tcp"), (OTHER, "api.demo.test.", "udp"),
             (STRANGER, "api.demo.test.", "udp")]
    for _ in range(3):
        for ip, name, protocol in cases:
            assert decider.decide(client(ip, protocol), question(name), DNS) == fresh(
                store, ip, name, protocol)
    assert decider.decide(client(WEB), question("api.demo.test."), DNS).allowed
    assert not decider.decide(client(WEB), question("www.demo.test."), DNS).allowed
    assert decider.decide(client(STRANGER), question("api.demo.test."), DNS).verdict == "no-endpoint"
    stats = decider.memo.stats
    assert (stats.misses, len(decider.memo)) == (len(cases), len(cases))
    assert stats.hits == 2 * len(cases) + 3


def test_a_reload_forgets_every_remembered_verdict(tmp_path: Path) -> None:
    store = make_store(tmp_path, ["api.demo.test"])
    decider = PolicyDecider(lambda: store.current)
    assert decider.decide(client(WEB), question("api.demo.test."), DNS).allowed
    assert not decider.decide(client(WEB), question("www.demo.test."), DNS).allowed
    make_store(tmp_path, ["www.demo.test"])  # the policy now allows www, not api
    store.load()
    assert not decider.decide(client(WEB), question("api.demo.test."), DNS).allowed
    assert decider.decide(client(WEB), question("www.demo.test."), DNS).allowed
    # The inventory is part of the snapshot too: a pod gone is unknown at once.
    (tmp_path / "endpoints.yaml").write_text(INVENTORY.replace('"10.0.0.2"', '"10.0.0.22"'))
    store.load()
    assert decider.decide(client(WEB), question("www.demo.test."), DNS).verdict == "no-endpoint"


def test_the_memo_keeps_to_its_cap(tmp_path: Path) -> None:
    store = make_store(tmp_path, ["api.demo.test"])
    decider = PolicyDecider(lambda: store.current, memo_size=8)
    for i in range(20):
        decider.decide(client(WEB), question(f"n{i}.demo.test."), DNS)
    assert len(decider.memo) == 8 and decider.memo.stats.evictions == 12
