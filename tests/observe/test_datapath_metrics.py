"""The datapath collector: kernel counters summed over endpoints, bounded labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from fqdnproxy.datapath.maps import Reason
from fqdnproxy.observe import datapath_metrics as dm


def _scrape(collector: dm.DatapathCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_are_summed_over_endpoints_by_verdict_and_reason() -> None:
    counters = {7: {Reason.PASS_ALLOWED: 5, Reason.DROP_NO_ENTRY: 2, Reason.EVENT_SUPPRESSED: 9},
                8: {Reason.DROP_NO_ENTRY: 1, Reason.AUDITED: 4}}
    samples = _scrape(dm.DatapathCollector(lambda: counters, lambda: {"exact": 3, "prefix": 1}))
    packets = "fqdnproxy_datapath_packets_total"
    assert samples[(packets, (("reason", "allowed"), ("verdict", "pass")))] == 5
    assert samples[(packets, (("reason", "no_entry"), ("verdict", "drop")))] == 3
    assert samples[(packets, (("reason", "audited"), ("verdict", "audit")))] == 4
    assert samples[(packets, (("reason", "spoofed"), ("verdict", "drop")))] == 0
    assert samples[("fqdnproxy_datapath_drop_events_suppressed_total", ())] == 9
    assert samples[("fqdnproxy_datapath_endpoints", ())] == 2
    assert samples[("fqdnproxy_allow_map_entries", (("map", "exact"),))] == 3
    # Bounded: one series per reason, whatever the number of endpoints; no ids, no addresses.
    labels = {k for name, labels in samples for k, _ in labels if name == packets}
    assert labels == {"verdict", "reason"}
    assert sum(1 for name, _ in samples if name == packets) == len(Reason) - 1


def test_allow_map_count_is_reused_between_scrapes() -> None:
    calls = []
    now = [0.0]

    def count() -> dict[str, int]:
        calls.append(now[0])
        return {"exact": len(calls), "prefix": 0}

    collector = dm.DatapathCollector(dict, count, clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(collector)
    generate_latest(registry)
    now[0] = dm.COUNT_INTERVAL - 1
    assert b'fqdnproxy_allow_map_entries{map="exact"} 1.0' in generate_latest(registry)
    now[0] = dm.COUNT_INTERVAL
    assert b'fqdnproxy_allow_map_entries{map="exact"} 2.0' in generate_latest(registry)
    assert calls == [0.0, dm.COUNT_INTERVAL]


def test_families_are_described_without_a_kernel() -> None:
    def boom() -> dict[int, dict[Reason, int]]:
        raise AssertionError("describe must not read the kernel")

    names = {family.name for family in dm.DatapathCollector(boom).describe()}
    assert names == {"fqdnproxy_datapath_packets", "fqdnproxy_datapath_drop_events_suppressed",
                     "fqdnproxy_datapath_endpoints", "fqdnproxy_allow_map_entries"}
