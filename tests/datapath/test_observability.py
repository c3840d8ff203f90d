"""Root tests: the real program's drop events reach the audit log as drop records (rate-limited
per endpoint, the rest counted), audit mode passes and reports, and the per-CPU counters come
out as bounded Prometheus series."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fqdnproxy.datapath import egress, pinned
from fqdnproxy.datapath.allowmap import AllowEntry, PortRange
from fqdnproxy.datapath.maps import EndpointFlags
from fqdnproxy.observe import datapath_metrics, drops
from fqdnproxy.observe.metrics import Metrics
from tests.datapath import topology as topo
from tests.support.audit_schema import RecordingAudit

pytestmark = pytest.mark.root

ENFORCE = EndpointFlags.ENFORCE_EGRESS
EP1, EP2 = 201, 202
IDENTITY = {EP1: {"id": EP1, "namespace": "demo", "name": "pod1", "labels": {}}}


@pytest.fixture(scope="module")
def net() -> Iterator[topo.Topology]:
    with topo.topology() as t:
        yield t


@pytest.fixture
def loaded(pin_dir: Path, bpffs: Path, net: topo.Topology) -> Iterator[egress.EgressDatapath]:
    dp = egress.EgressDatapath.load(pin_dir, egress.Options(events_per_sec=100), bpffs=bpffs)
    try:
        for pod in (net.pod1, net.pod2):
            dp.attach(pod.host_if, netns=net.node)
        dp.set_endpoint(net.pod1.ip, EP1, ENFORCE, net.ifindex(net.pod1))
        dp.set_endpoint(net.pod2.ip, EP2, ENFORCE | EndpointFlags.AUDIT, net.ifindex(net.pod2))
        dp.upsert_allows([AllowEntry(EP1, "203.0.113.5/32", 0, (PortRange.parse("tcp/8080"),))])
        yield dp
    finally:
        for pod in (net.pod1, net.pod2):
            dp.detach(pod.host_if, netns=net.node)
        dp.close()


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_drops_become_rate_limited_audit_records(loaded: egress.EgressDatapath,
                                                 net: topo.Topology) -> None:
    audit = RecordingAudit()  # validates each record against the schema
    metrics = Metrics()
    limiter = drops.DropLimiter(rate=0.01, burst=2, identity=IDENTITY.get)
    auditor = drops.DropAuditor(loaded, audit, limiter, metrics).start()
    try:
        probes = [f"udp,203.0.113.6,{port}" for port in (8080, 8081, 9000, 53)]
        assert net.probe(net.pod1, "tcp,203.0.113.5,8080", *probes) == [True] + [False] * 4
        assert net.probe(net.pod2, "udp,203.0.113.6,9000") == [True]  # audit mode: passes
        _wait_for(lambda: metrics.drop_events.labels("suppressed")._value.get() >= 2)
    finally:
        auditor.stop()
    records = [r.to_dict() for r in audit.records]
    # Nothing lost uncounted: every event is a record or counted in a later one's "suppressed".
    logged = metrics.drop_events.labels("logged")._value.get()
    suppressed = metrics.drop_events.labels("suppressed")._value.get()
    assert sum(r["type"] == "drop" for r in records) == logged
    assert sum(r["suppressed"] for r in records) == suppressed
    # pod1 (enforced): its first drops are records, the rest only counted (burst 2).
    mine = [r for r in records if r["endpoint_id"] == EP1]
    assert [r["type"] for r in mine] == ["drop", "drop", "drop_summary"]
    assert all(r["endpoint"]["name"] == "pod1" for r in mine)
    assert mine[-1]["suppressed"] >= 2
    probed = [r for r in mine if r["type"] == "drop" and r["destination"]["ip"] == "203.0.113.6"]
    if probed:  # (IPv6 neighbour traffic of the pod may take the burst first)
        first = probed[0]
        assert (first["source"]["ip"], first["protocol"], first["reason"], first["verdict"]) == (
            net.pod1.ip, "udp", "no_entry", "dropped")
        assert first["destination"]["port"] in (8080, 8081, 9000, 53)
    # pod2 (audit mode): the packet passed, and was reported with verdict "audit".
    audited = [r for r in records if r["endpoint_id"] == EP2 and r["type"] == "drop"]
    assert audited and all(r["verdict"] == "audit" and r["endpoint"] is None for r in audited)
    assert {"ip": "203.0.113.6", "port": 9000} in [r["destination"] for r in audited] or any(
        r["type"] == "drop_summary" for r in records if r["endpoint_id"] == EP2)


def test_counters_are_exported_by_verdict_and_reason(loaded: egress.EgressDatapath,
                                                     net: topo.Topology) -> None:
    metrics = Metrics()
    metrics.watch_datapath(loaded)
    assert net.probe(net.pod1, "tcp,203.0.113.5,8080", "tcp,203.0.113.5,8081",
                     "tcp,203.0.113.7,8080") == [True, False, False]
    assert net.probe(net.pod2, "tcp,203.0.113.7,8080") == [True]
    text = generate_latest(metrics.registry).decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("fqdnproxy_")}
    packets = "fqdnproxy_datapath_packets_total"
    assert samples[f'{packets}{{reason="allowed",verdict="pass"}}'] >= 1
    assert samples[f'{packets}{{reason="port",verdict="drop"}}'] >= 1
    assert samples[f'{packets}{{reason="no_entry",verdict="drop"}}'] >= 1
    assert samples[f'{packets}{{reason="audited",verdict="audit"}}'] >= 1
    assert samples['fqdnproxy_allow_map_entries{map="exact"}'] == 1
    assert samples['fqdnproxy_allow_map_entries{map="prefix"}'] == 0
    assert samples["fqdnproxy_datapath_endpoints"] == 2
    assert not any(net.pod1.ip in name or str(EP1) in name for name in samples)
    assert datapath_metrics.count_allow_entries(loaded.maps) == {"exact": 1, "prefix": 0}
    pinned.clear_flows(loaded.maps)
