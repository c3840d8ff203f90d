"""Prometheus metrics, all under ``fqdnproxy_``.

Every metric lives on a ``Metrics`` instance with its own registry, so tests and benchmarks can
run several proxies in one process. Label values are bounded: verdicts, rcodes, reasons and a
short list of query types; never a name or an IP.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fqdnproxy.observe.loop_metrics import LoopCounter, LoopHistogram

# Query types that get their own label value; everything else is "other". Bounded on purpose.
QTYPE_LABELS: dict[int, str] = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY",
}
RCODE_LABELS: dict[int, str] = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
}

# Upstream round trips on a LAN are sub-millisecond; timeouts are seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)


def qtype_label(qtype: int) -> str:
    """The bounded label value for a query type."""
    return QTYPE_LABELS.get(qtype, "other")


def rcode_label(rcode: int) -> str:
    """The bounded label value for a response code."""
    return RCODE_LABELS.get(rcode, "other")


class Metrics:
    """The agent's metrics. Attributes are prometheus-client collectors, except the query
    path's per-query series (``loop_metrics``: lock-free, for the loop's thread only).

    ``child(metric, *labels)`` is the hot path's way to a labelled series: it caches the child
    that ``metric.labels(...)`` returns, which otherwise re-validates the labels on every call.
    The cache is bounded because every label value is.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[object, ...], Any] = {}
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The query path's own series: updated on every query, from the loop's thread only.
        self.queries = LoopCounter(
            "fqdnproxy_queries", "Client queries by verdict, query type and protocol",
            ["verdict", "qtype", "protocol"], registry=r)
        self.answers = LoopCounter(
            "fqdnproxy_answers", "Answers released to clients by response code",
            ["rcode"], registry=r)
        self.malformed = Counter(
            "fqdnproxy_malformed_queries", "Client messages that could not be read, by outcome "
            "(formerr: answered FORMERR; dropped: not even a header; no_original_destination: "
            "a redirected datagram without its original address)", ["outcome"], registry=r)
        self.overload = Counter(
            "fqdnproxy_overload_rejections", "Queries answered SERVFAIL because the in-flight "
            "cap was reached", registry=r)
        self.in_flight = Gauge(
            "fqdnproxy_queries_in_flight", "Queries being handled now", registry=r)
        self.workers_running = Gauge(
            "fqdnproxy_dns_workers_running", "DNS worker processes the primary runs now, "
            "itself not counted (dns.workers - 1 when all are up)", registry=r)
        self.worker_restarts = Counter(
            "fqdnproxy_dns_worker_restarts", "DNS worker processes started again after they "
            "exited, by worker index", ["worker"], registry=r)
        self.upstream_latency = LoopHistogram(
            "fqdnproxy_upstream_latency_seconds", "Time from forwarding a query to its answer",
            ["protocol"], registry=r, buckets=LATENCY_BUCKETS)
        self.total_latency = LoopHistogram(
            "fqdnproxy_query_latency_seconds", "Time from receiving a query to releasing the "
            "answer", ["protocol"], registry=r, buckets=LATENCY_BUCKETS)
        self.upstream_errors = Counter(
            "fqdnproxy_upstream_errors", "Upstream exchanges that failed, by reason "
            "(timeout; unreachable: ICMP error, refused or reset; bad_answer)", ["reason"], registry=r)
        self.upstream_stray = Counter(
            "fqdnproxy_upstream_stray_answers", "Upstream messages dropped, by reason: "
            "unknown_id, wrong_question, not_response, unreadable (answers from another address "
            "never reach the proxy: its upstream sockets are connected)", ["reason"], registry=r)
        self.upstream_sockets = Gauge(
            "fqdnproxy_upstream_sockets", "Open upstream UDP sockets", registry=r)
        self.upstream_rotations = Counter(
            "fqdnproxy_upstream_socket_rotations", "Upstream UDP sockets replaced by a socket "
            "on a new random port", registry=r)
        self.reply_failures = Counter(
            "fqdnproxy_transparent_reply_failures", "Answers to redirected UDP queries that "
            "could not be sent from the original server address", registry=r)
        self.tcp_connections = Gauge(
            "fqdnproxy_tcp_connections", "Open client TCP connections", registry=r)
        self.tcp_closed = Counter(
            "fqdnproxy_tcp_connections_closed", "Client TCP connections closed by the proxy, "
            "by reason (limit, idle, stalled: a partial message stalled, not_reading: the "
            "client stopped reading its answers)", ["reason"], registry=r)
        self.handler_errors = Counter(
            "fqdnproxy_handler_errors", "Unexpected exceptions caught at the handler boundary "
            "(answered SERVFAIL)", registry=r)
        self.audit_dropped = Counter(
            "fqdnproxy_audit_records_dropped", "Audit records dropped because the sink's queue "
            "was full", registry=r)
        self.audit_queue = Gauge(
            "fqdnproxy_audit_queue_records", "Audit records waiting to be written", registry=r)
        self.dnstap_frames = Counter(
            "fqdnproxy_dnstap_frames_written", "dnstap data frames written, by output (file, "
            "socket)", ["output"], registry=r)
        self.dnstap_dropped = Counter(
            "fqdnproxy_dnstap_frames_dropped", "dnstap frames dropped, by output and reason "
            "(queue_full; disconnected: no socket reader; write_error)", ["output", "reason"],
            registry=r)
        self.policy_reloads = Counter(
            "fqdnproxy_policy_reloads", "Policy and inventory loads by result (loaded: at "
            "start; reloaded; rejected: invalid, the previous version kept serving)",
            ["result"], registry=r)
        # Observed by the learn stage for every answer it writes, on the loop's thread only
        # (prometheus-client's histogram was 1.5% of the learn benchmark's CPU).
        self.allow_map_update = LoopHistogram(
            "fqdnproxy_allow_map_update_seconds", "Time to write an answer's entries to the "
            "allow map, before the answer is released", [], registry=r,
            buckets=LATENCY_BUCKETS).labels()
        self.gc_deleted = Counter(
            "fqdnproxy_gc_deleted_entries", "Expired cache entries removed by garbage "
            "collection (their map entries rewritten or deleted)", registry=r)
        self.gc_step = Histogram(
            "fqdnproxy_gc_step_seconds", "Event-loop time of one garbage-collection step",
            buckets=LATENCY_BUCKETS, registry=r)
        self.snapshots = Counter(
            "fqdnproxy_cache_snapshots", "Cache snapshots by result (ok: written; error: not "
            "written, the state directory missing, unwritable or full)",
            ["result"], registry=r)
        self.drop_events = Counter(
            "fqdnproxy_drop_events", "Datapath drop events read from the kernel, by outcome "
            "(logged: an audit record; suppressed: over the per-endpoint audit rate, counted in "
            "the next record or a drop_summary record)", ["outcome"], registry=r)
        self.program_loads = Counter(
            "fqdnproxy_datapath_program_loads", "Compiles, loads and attaches of the tc program "
            "by result (ok; error: the agent stops with status 3, the program attached before "
            "goes on enforcing from the pinned maps)", ["result"], registry=r)
        self.program_load_seconds = Gauge(
            "fqdnproxy_datapath_program_load_seconds", "How long the last load of the tc "
            "program took (compile, load and attach)", registry=r)
        self.program_attached = Gauge(
            "fqdnproxy_datapath_program_attached", "1 once this agent's tc program is "
            "attached; 0 while it compiles and the previous agent's program enforces from the "
            "pinned maps", registry=r)

    def watch_cache(self, cache: Any, memo_sizes: Any = None) -> None:
        """Export the FQDN cache's sizes and evictions, read at scrape time (no hot-path cost).

        ``memo_sizes`` returns the learn stage's memo sizes (``fqdn.learner.memo_sizes``).
        """
        self.registry.register(_CacheCollector(cache, memo_sizes or dict))

    def watch_rate_limit(self, buckets: Any) -> None:
        """Export the per-client rate limiter's size and evictions (``ratelimit.TokenBuckets``);
        one limiter per registry (a second is not exported)."""
        try:
            self.registry.register(_RateLimitCollector(buckets))
        except ValueError:  # already exported by another proxy on this registry
            pass

    def watch_parse_cache(self, cache: Any) -> None:
        """Export a ``dns.parse_cache.ParseCache``'s size, hits, misses and evictions
        (``fqdnproxy_parse_cache_*``); one per registry (a second proxy's is not exported)."""
        stats = cache.stats()
        self._watch_memo(_MemoCollector(
            "fqdnproxy_parse_cache", "Parsed messages", "kind",
            lambda: {kind: (size, stats[kind]) for kind, size in cache.sizes().items()}))

    def watch_decisions(self, decider: Any) -> None:
        """Export a ``policy.decider.PolicyDecider``'s verdict memo (``fqdnproxy_decision_cache_*``)."""
        self._watch_memo(_MemoCollector(
            "fqdnproxy_decision_cache", "Policy verdicts", "",
            lambda: {"": (len(decider.memo), decider.memo.stats)}))

    def watch_audit_renderer(self, renderer: Any) -> None:
        """Export an ``audit.AuditRenderer``'s memos (``fqdnproxy_audit_memo_*``, by memo:
        answers, dates, endpoints); one per registry."""
        self._watch_memo(_MemoCollector(
            "fqdnproxy_audit_memo", "Rendered audit fields", "memo",
            lambda: {name: (len(memo), memo.stats) for name, memo in renderer.memos().items()}))

    def _watch_memo(self, collector: _MemoCollector) -> None:
        try:
            self.registry.register(collector)
        except ValueError:  # already exported on this registry
            pass

    def watch_datapath(self, datapath: Any) -> None:
        """Export the datapath's per-CPU counters and allow-map sizes, read at scrape time.

        ``datapath`` is an ``egress.EgressDatapath`` (``counters()``, ``maps``).
        """
        from fqdnproxy.observe import datapath_metrics

        self.registry.register(datapath_metrics.DatapathCollector(
            datapath.counters, lambda: datapath_metrics.count_allow_entries(datapath.maps)))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class _CacheCollector:
    """``fqdnproxy_cache_*``: read from an ``fqdn.cache.FqdnCache`` when Prometheus scrapes."""

    def __init__(self, cache: Any, memo_sizes: Any) -> None:
        self._cache = cache
        self._memo_sizes = memo_sizes

    def describe(self) -> list[Any]:
        return []  # no registration-time collection

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cache = self._cache
        yield GaugeMetricFamily("fqdnproxy_cache_entries",
                                "Learned (endpoint, name, IP) entries in the FQDN cache",
                                value=len(cache))
        yield GaugeMetricFamily("fqdnproxy_cache_names",
                                "Learned (endpoint, name) pairs in the FQDN cache",
                                value=cache.name_count())
        evictions = CounterMetricFamily(
            "fqdnproxy_cache_evictions", "Cache entries evicted by a cap, by cap "
            "(ips_per_name, names_per_endpoint, entries)", labels=["cap"])
        for cap, count in cache.evictions.items():
            evictions.add_metric([cap], count)
        yield evictions
        memos = GaugeMetricFamily(
            "fqdnproxy_learner_memo_entries", "Entries in the learn stage's LRU memos (each "
            "capped), by memo", labels=["memo"])
        for memo, size in self._memo_sizes().items():
            memos.add_metric([memo], size)
        yield memos


class _RateLimitCollector:
    """``fqdnproxy_rate_limit_*``: read from a ``ratelimit.TokenBuckets`` at scrape time."""

    def __init__(self, buckets: Any) -> None:
        self._buckets = buckets

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("fqdnproxy_rate_limit_clients",
                                "Client addresses with a token bucket (capped; the oldest goes)",
                                value=len(self._buckets))
        yield CounterMetricFamily("fqdnproxy_rate_limit_evictions",
                                  "Token buckets dropped because the client cap was reached",
                                  value=self._buckets.evictions)


class _MemoCollector:
    """``<prefix>_entries``, ``<prefix>_lookups_total{result}`` and ``<prefix>_evictions_total``
    of hot-path memos (``memo.BoundedMemo``), read at scrape time. ``memos()`` maps a label value
    (of ``label``; one memo and no label when ``label`` is empty) to (entries, MemoStats)."""

    def __init__(self, prefix: str, what: str, label: str, memos: Any) -> None:
        self._prefix = prefix
        self._what = what
        self._label = label
        self._memos = memos

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = [self._label] if self._label else []
        by = f", by {self._label}" if self._label else ""
        entries = GaugeMetricFamily(f"{self._prefix}_entries", f"{self._what} remembered{by} "
                                    "(capped; the oldest goes)", labels=labels)
        lookups = CounterMetricFamily(
            f"{self._prefix}_lookups", f"Lookups of {self._what}{by}, by result (hit: remembered; "
            "miss: computed now)", labels=[*labels, "result"])
        evictions = CounterMetricFamily(
            f"{self._prefix}_evictions", f"{self._what} dropped because the cap was reached{by}",
            labels=labels)
        for value, (size, stats) in self._memos().items():
            key = [value] if self._label else []
            entries.add_metric(key, size)
            lookups.add_metric([*key, "hit"], stats.hits)
            lookups.add_metric([*key, "miss"], stats.misses)
            evictions.add_metric(key, stats.evictions)
        yield entries
        yield lookups
        yield evictions
