"""The README stays current: every option and every metric the agent has is documented there."""

from __future__ import annotations

from pathlib import Path

from fqdnproxy import config
from fqdnproxy.fqdn import learner
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.observe.metrics import Metrics

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_option_is_documented() -> None:
    for key, _, _ in config.describe():
        assert f"`{key}`" in README, key
    assert "`log_level`" in README


def test_every_metric_is_documented() -> None:
    metrics = Metrics()
    metrics.watch_cache(FqdnCache(), learner.memo_sizes)
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in README, name


def test_the_two_commands_are_there() -> None:
    assert "make demo" in README and "make test" in README
