"""Audit mode: refusals become verdict "audit" and go on (decider, the proxy on loopback), and
audited endpoints get the datapath's AUDIT flag."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dnslib import DNSRecord

from fqdnproxy import proxy as proxy_mod
from fqdnproxy.datapath import policy_sync
from fqdnproxy.datapath.allowmap import InMemoryAllowMap
from fqdnproxy.datapath.maps import EndpointFlags
from fqdnproxy.dns import server as server_mod
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.endpoints import Endpoint
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner
from fqdnproxy.observe.metrics import Metrics
from fqdnproxy.policy import audit_mode
from fqdnproxy.policy.decider import PolicyDecider
from fqdnproxy.policy.reload import PolicyStore
from tests.support.audit_schema import RecordingAudit
from tests.support.dns_client import udp_query
from tests.support.fake_upstream import FakeUpstream
from tests.support.policies import web_policy

WEB, CANARY, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.9"

def policy(port: int) -> str:
    return web_policy(["matchName: api.demo.test"], ["matchName: api.demo.test"], dns_port=port)

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["127.0.0.2"]}
  - {namespace: demo, name: canary, id: 2, labels: {app: web, "fqdnproxy.io/audit": "true"},
     ips: ["127.0.0.3"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["127.0.0.1"]}
"""


def test_the_label_and_the_global_switch() -> None:
    plain = Endpoint(1, "demo", "web", {"app": "web"}, ("192.0.2.1",))
    labelled = Endpoint(2, "demo", "canary", {audit_mode.LABEL: "True"}, ("192.0.2.2",))
    assert not audit_mode.audited(plain, False) and audit_mode.audited(labelled, False)
    assert audit_mode.audited(plain, True) and audit_mode.audited(None, True)
    assert not audit_mode.audited(None, False)


class Rig:
    def __init__(self, tmp_path: Path, globally: bool) -> None:
        self.tmp_path = tmp_path
        self.globally = globally

    async def start(self) -> Rig:
        policies = self.tmp_path / "policies"
        policies.mkdir()
        (self.tmp_path / "endpoints.yaml").write_text(INVENTORY)
        self.store = store = PolicyStore(policies, self.tmp_path / "endpoints.yaml")
        self.upstream = await FakeUpstream().start()
        self.upstream.add("api.demo.test. 300 IN A 203.0.113.10",
                          "other.demo.test. 300 IN A 203.0.113.66")
        metrics = Metrics()
        self.metrics = metrics
        self.audit = RecordingAudit()
        self.client = upstream_mod.UpstreamClient(upstream_mod.UpstreamSettings(timeout=1.0),
                                                  metrics)
        await self.client.start()
        self.allow_map = InMemoryAllowMap()
        self.cache = FqdnCache()
        learner = AllowLearner(self.cache, self.allow_map,
                               lambda i: store.current.engine.for_id(i))
        decider = audit_mode.AuditModeDecider(
            PolicyDecider(lambda: store.current),
            lambda endpoint: audit_mode.audited(endpoint, self.globally))
        proxy = proxy_mod.Proxy(self.client, proxy_mod.RoundRobinUpstreams([self.upstream.address]),
                                self.audit, metrics, decider=decider, learner=learner)
        self.server = server_mod.DnsServer([("127.0.0.1", 0)], proxy.handle, metrics,
                                           server_mod.ListenerLimits(),
                                           receive=proxy.receive)
        await self.server.start()
        self.address = ("127.0.0.1", self.server.bound[0][2])
        (policies / "web.yaml").write_text(policy(self.address[1]))
        store.load()
        return self

    async def ask(self, name: str, source: str) -> DNSRecord:
        answer = await udp_query(self.address, DNSRecord.question(name, "A"), source=source)
        assert answer is not None
        return answer

    async def close(self) -> None:
        await self.server.stop()
        await self.client.close()
        await self.upstream.stop()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = await Rig(tmp_path, globally=False).start()
    yield rig
    await rig.close()


async def test_an_audited_endpoint_gets_what_policy_would_refuse(rig: Rig) -> None:
    answer = await rig.ask("other.demo.test", CANARY)
    assert answer.header.rcode == 0 and str(answer.rr[0].rdata) == "203.0.113.66"
    record = rig.audit.records[-1]
    assert (record.type, record.verdict, record.rcode) == ("answer", "audit", "NOERROR")
    assert record.reason.startswith("audit mode, would be denied: ")
    assert record.endpoint["name"] == "canary"
    assert not rig.allow_map.dump()  # nothing selects the name: no allow entry is written
    queries = rig.metrics.registry.get_sample_value(
        "fqdnproxy_queries_total", {"verdict": "audit", "qtype": "A", "protocol": "udp"})
    assert queries == 1


async def test_an_enforced_endpoint_is_still_refused(rig: Rig) -> None:
    answer = await rig.ask("other.demo.test", WEB)
    assert answer.header.rcode == 5
    assert rig.audit.records[-1].verdict == "denied"
    answer = await rig.ask("api.demo.test", CANARY)  # allowed stays allowed, and is learned
    assert answer.header.rcode == 0 and rig.audit.records[-1].verdict == "allowed"
    assert [e.endpoint_id for e in rig.allow_map.dump()] == [2]


async def test_an_unknown_source_only_in_global_audit_mode(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, globally=True).start()
    try:
        answer = await rig.ask("other.demo.test", STRANGER)
        assert answer.header.rcode == 0
        record = rig.audit.records[-1]
        assert record.verdict == "audit" and "would be no-endpoint" in record.reason
        assert (await rig.ask("other.demo.test", WEB)).header.rcode == 0
    finally:
        await rig.close()


def test_audited_endpoints_get_the_datapath_audit_flag(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "web.yaml").write_text(policy(53))
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    current = PolicyStore(tmp_path / "policies", tmp_path / "endpoints.yaml").load()
    cache = FqdnCache()
    learner = AllowLearner(cache, InMemoryAllowMap(), lambda i: current.engine.for_id(i))
    enforce = int(EndpointFlags.ENFORCE_EGRESS)
    audit = int(EndpointFlags.ENFORCE_EGRESS | EndpointFlags.AUDIT)

    def flags(globally: bool) -> dict[str, int]:
        state = policy_sync.desired_state(
            current.engine, current.registry, learner.entry_for, [],
            audited=lambda endpoint: audit_mode.audited(endpoint, globally))
        return {ip: value[1] for ip, value in state.endpoints.items()}

    assert flags(False) == {WEB: enforce, CANARY: audit}
    assert flags(True) == {WEB: audit, CANARY: audit}
    default = policy_sync.desired_state(current.engine, current.registry, learner.entry_for, [])
    assert default.endpoints[CANARY][1] == enforce
