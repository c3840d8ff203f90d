"""The Grafana dashboard only queries metrics the agent exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fqdnproxy.fqdn import learner
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.observe.datapath_metrics import DatapathCollector
from fqdnproxy.observe.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "dashboards" / "fqdnproxy.json"
METRIC = re.compile(r"\bfqdnproxy_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exposed() -> set[str]:
    """Every series name the agent can expose, datapath included (described, no kernel)."""
    metrics = Metrics()
    metrics.watch_cache(FqdnCache(), learner.memo_sizes)
    families = list(metrics.registry.collect())
    families += DatapathCollector(dict).describe()
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_queried_metric_exists() -> None:
    names = exposed()
    used = {name for expr in queries() for name in METRIC.findall(expr)}
    assert used and not used - names, sorted(used - names)


def test_it_covers_what_the_issue_asks() -> None:
    exprs = "\n".join(queries())
    for needle in ("fqdnproxy_queries_total", "histogram_quantile(0.99",
                   "fqdnproxy_upstream_errors_total", "fqdnproxy_cache_entries",
                   "fqdnproxy_allow_map_entries", 'verdict="drop"', "fqdnproxy_policy_reloads_total"):
        assert needle in exprs, needle


def test_the_check_catches_a_typo() -> None:
    assert "fqdnproxy_querys_total" not in exposed()
    assert "fqdnproxy_query_latency_seconds_bucket" in exposed()
