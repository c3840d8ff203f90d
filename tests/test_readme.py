"""The README stays current: every option and every metric the agent has is documented there."""

from __future__ import annotations

from pathlib import Path

from fqdnproxy import config
from fqdnproxy.fqdn import learner
from fqdnproxy.ratelimit import RateLimit, TokenBuckets
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.observe.datapath_metrics import DatapathCollector
from fqdnproxy.observe.metrics import Metrics

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_option_is_documented() -> None:
    for key, _, _ in config.describe():
        assert f"`{key}`" in README, key
    assert "`log_level`" in README


def test_every_metric_is_documented() -> None:
    metrics = Metrics()
    metrics.watch_cache(FqdnCache(), learner.memo_sizes)
    metrics.watch_rate_limit(TokenBuckets(RateLimit()))
    datapath = DatapathCollector(dict).describe()  # the datapath's families, without a kernel
    for family in [*metrics.registry.collect(), *datapath]:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in README, name


def test_the_two_commands_are_there() -> None:
    assert "make demo" in README and "make test" in README


def test_every_admin_command_and_audit_record_type_is_documented() -> None:
    for command in ("fqdnproxy status", "fqdnproxy endpoint list", "fqdnproxy policy list",
                    "fqdnproxy cache list", "fqdnproxy cache clean", "fqdnproxy map dump"):
        assert command in README, command
    for record_type in ('"type":"drop"', '"type":"drop_summary"'):
        assert record_type in README, record_type
