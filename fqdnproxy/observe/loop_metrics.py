"""Counters and histograms for the query path: plain numbers, no lock, collected at scrape time.

prometheus-client's own counters take a lock on every ``inc`` and its histograms walk their
buckets in Python; the query path updates six series per query, which was a tenth of its cost.
The query path runs on the event loop's thread only, so its series need no lock: a child here
is two attributes and an ``inc`` is one addition. Prometheus reads them from the HTTP thread
through ``collect`` (a registered custom collector), which copies the children first: a scrape
can never see a half-made series, at worst one that is a query behind.

Names, labels, types and exposition are exactly prometheus-client's (``_total``, ``_bucket``,
``_sum``, ``_count``). Only ``inc`` and ``observe`` exist: the query path needs nothing else.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString


class LoopCounterChild:
    """One labelled series of a ``LoopCounter``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogramChild:
    """One labelled series of a ``LoopHistogram``: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le="bound").
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LoopMetric:
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        """The series for these label values (made on first use; label values are bounded)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, "
                             f"got {values!r}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Any]:
        return []

    def _series(self) -> list[tuple[tuple[str, ...], Any]]:
        return list(self._children.items())  # one C-level copy: safe against a new series

    def _new_child(self) -> Any:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    """A labelled counter for the event loop's thread (``name`` without ``_total``)."""

    def _new_child(self) -> LoopCounterChild:
        return LoopCounterChild()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(_LoopMetric):
    """A labelled histogram for the event loop's thread."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self.bounds)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        yield family


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` as prometheus-client writes it ("0.005", "1.0", "+Inf")."""
    return floatToGoString(bound)
