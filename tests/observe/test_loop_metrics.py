"""The query path's lock-free series expose exactly what prometheus-client's own would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fqdnproxy.observe.loop_metrics import LoopCounter, LoopHistogram
from fqdnproxy.observe.metrics import LATENCY_BUCKETS

values = st.floats(min_value=0, max_value=10, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["udp", "tcp"]), values), max_size=40))
def test_a_histogram_exposes_what_prometheus_client_exposes(observations) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("x_seconds", "help", ["protocol"], registry=ours, buckets=LATENCY_BUCKETS)
    reference = Histogram("x_seconds", "help", ["protocol"], registry=theirs,
                          buckets=LATENCY_BUCKETS)
    # Bucket bounds themselves: a value equal to a bound counts in that bound's bucket.
    for protocol, value in [*observations, ("udp", 0.001), ("udp", 5.0)]:
        mine.labels(protocol).observe(value)
        reference.labels(protocol).observe(value)
    assert _samples(ours) == _samples(theirs)


def test_a_counter_exposes_what_prometheus_client_exposes() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopCounter("q", "help", ["verdict", "qtype"], registry=ours)
    reference = Counter("q", "help", ["verdict", "qtype"], registry=theirs)
    for labels, amount in [(("allowed", "A"), 1), (("denied", "AAAA"), 3), (("allowed", "A"), 2)]:
        mine.labels(*labels).inc(amount)
        reference.labels(*labels).inc(amount)
    assert _samples(ours) == _samples(theirs)
    assert ours.get_sample_value("q_total", {"verdict": "allowed", "qtype": "A"}) == 3


def test_wrong_label_counts_are_an_error() -> None:
    counter = LoopCounter("q", "help", ["verdict"], registry=CollectorRegistry())
    try:
        counter.labels("a", "b")
    except ValueError as error:
        assert "1 label values expected" in str(error)
    else:
        raise AssertionError("two values for one label were accepted")


def _samples(registry: CollectorRegistry) -> list[str]:
    """The exposition's sample lines (``_created`` lines aside: ours have no creation time)."""
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if line and "_created" not in line)
