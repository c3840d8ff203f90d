"""Prometheus metrics of the datapath's userspace side (the kernel's own are the counters map)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class DatapathMetrics:
    """GC metrics, on a registry of the caller's choice (a private one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.gc_deleted = Counter(
            "fqdnproxy_datapath_gc_deleted_entries_total",
            "Expired allow entries deleted by userspace GC", registry=self.registry)
        self.gc_seconds = Histogram(
            "fqdnproxy_datapath_gc_duration_seconds", "Duration of one GC pass",
            buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0), registry=self.registry)
