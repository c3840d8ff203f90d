"""Python's cyclic garbage collector, watched: how long each collection stops the agent.

A collection stops every thread of the agent, the event loop included, for as long as it walks
the objects of the generations it collects: fractions of a millisecond for the young ones, tens
of milliseconds for a full collection once the FQDN cache holds a million entries. Those pauses
are the query path's worst latencies, so they are exported
(``fqdnproxy_python_gc_pause_seconds{generation}``) and ``freeze_startup_objects`` takes what
startup built (modules, bcc, the compiled policies) out of every later full collection.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from fqdnproxy.observe.loop_metrics import LoopHistogram

# Young collections take microseconds to a millisecond; full ones up to tens of milliseconds.
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class GcPauseRecorder:
    """A ``gc.callbacks`` entry timing every collection into a histogram by generation.

    Collections never overlap (the collector holds the interpreter lock throughout), so the
    start time needs no lock; the histogram is only read by the scrape, which copies it.
    """

    def __init__(self, registry: Any) -> None:
        self.pauses = LoopHistogram(
            "fqdnproxy_python_gc_pause_seconds", "Pauses of Python's cyclic garbage collector "
            "(every thread stops), by generation collected (0, 1: young; 2: full)",
            ["generation"], registry=registry, buckets=PAUSE_BUCKETS)
        self._children = {g: self.pauses.labels(str(g)) for g in range(3)}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> GcPauseRecorder:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now to the collector's permanent generation,
    so later full collections walk only what was made since; returns how many were moved.

    Safe for what startup leaves behind: it lives as long as the agent (a replaced policy
    snapshot is freed by reference counting, cycles aside, and its memory is small)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
