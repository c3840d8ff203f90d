"""``fqdnproxy_datapath_*`` and ``fqdnproxy_allow_map_entries``: the kernel's counters at scrape.

The tc program counts every packet it judges in a per-CPU array, per endpoint and reason
(``datapath.maps.Reason``). A scrape sums them over CPUs and over endpoints: the labels are the
verdict and the reason only, never an endpoint or an address, so the series stay bounded
(``fqdnproxy endpoint list`` shows the per-endpoint numbers). An endpoint's counters go with its
last address (its counters slot is reused), so a sum can go down after an endpoint leaves the
inventory; Prometheus reads that as a counter reset, which ``rate()`` handles.

The families are described statically (``describe``), so the dashboard test can check their
names without a kernel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fqdnproxy.datapath.maps import Reason

PACKETS = "fqdnproxy_datapath_packets"
EVENTS_SUPPRESSED = "fqdnproxy_datapath_drop_events_suppressed"
ALLOW_ENTRIES = "fqdnproxy_allow_map_entries"
ENDPOINTS = "fqdnproxy_datapath_endpoints"
COUNT_INTERVAL = 30.0  # s; counting a 1M-entry allow map walks it, so the count is reused this long


def verdict(reason: Reason) -> str:
    """``pass``, ``drop`` or ``audit`` (dropped, but the endpoint is in audit mode)."""
    if reason == Reason.AUDITED:
        return "audit"
    return "drop" if reason.is_drop else "pass"


def reason_label(reason: Reason) -> str:
    """The reason as a label value: ``no_entry``, ``established``, ... (bounded: the enum)."""
    name = reason.name.lower()
    for prefix in ("pass_", "drop_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


class DatapathCollector:
    """Reads a datapath (``egress.EgressDatapath`` or anything with ``counters()``) at scrape.

    ``count_entries`` returns the allow maps' sizes by map (``exact``, ``prefix``); it walks the
    maps, so its result is kept for ``COUNT_INTERVAL`` seconds.
    """

    def __init__(self, counters: Callable[[], Mapping[int, Mapping[Reason, int]]],
                 count_entries: Callable[[], Mapping[str, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counters = counters
        self._count_entries = count_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._counted: tuple[float, Mapping[str, int]] | None = None

    def describe(self) -> list[Metric]:
        """The families, without reading the kernel (names for the dashboard test)."""
        return [_packets(), _suppressed(), _endpoints(), _entries()]

    def collect(self) -> Iterator[Metric]:
        per_endpoint = self._counters()
        totals: dict[Reason, int] = {}
        for reasons in per_endpoint.values():
            for reason, count in reasons.items():
                totals[reason] = totals.get(reason, 0) + count
        packets, suppressed = _packets(), _suppressed()
        for reason in Reason:
            if reason == Reason.EVENT_SUPPRESSED:
                suppressed.add_metric([], totals.get(reason, 0))
            else:
                packets.add_metric([verdict(reason), reason_label(reason)], totals.get(reason, 0))
        yield packets
        yield suppressed
        endpoints = _endpoints()
        endpoints.add_metric([], len(per_endpoint))
        yield endpoints
        entries = _entries()
        for name, count in self._entry_counts().items():
            entries.add_metric([name], count)
        yield entries

    def _entry_counts(self) -> Mapping[str, int]:
        if self._count_entries is None:
            return {}
        with self._lock:  # two concurrent scrapes walk the maps once
            now = self._clock()
            if self._counted is None or now - self._counted[0] >= COUNT_INTERVAL:
                self._counted = (now, dict(self._count_entries()))
            return self._counted[1]


def count_allow_entries(maps_: Any) -> dict[str, int]:
    """Entries in ``allow_exact`` and ``allow`` of ``pinned.PinnedMaps``, walking keys only."""
    from fqdnproxy.datapath import maps as codecs

    # Raw batched iteration: decoding a million entries into AllowEntry would take seconds.
    exact = sum(1 for _ in maps_._iterate("allow_exact", codecs.ExactKey, codecs.AllowValue))
    prefix = sum(1 for _ in maps_._iterate("allow", codecs.AllowKeyC, codecs.AllowValue))
    return {"exact": exact, "prefix": prefix}


def _packets() -> CounterMetricFamily:
    return CounterMetricFamily(
        PACKETS, "Packets the tc program judged, summed over endpoints, by verdict (pass, drop, "
        "audit) and reason", labels=["verdict", "reason"])


def _suppressed() -> CounterMetricFamily:
    return CounterMetricFamily(
        EVENTS_SUPPRESSED, "Drop events the kernel did not send (over its per-endpoint rate "
        "or ring buffer full); the drops themselves are counted", labels=[])


def _endpoints() -> GaugeMetricFamily:
    return GaugeMetricFamily(ENDPOINTS, "Endpoint ids with counters in the datapath", labels=[])


def _entries() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        ALLOW_ENTRIES, "Entries in the kernel's allow maps, by map (exact: /32 and /128, what "
        "DNS answers teach; prefix: CIDR rules); counted at most every 30 s", labels=["map"])
