"""Python's collector pauses are timed by generation, and startup's objects can be frozen."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from fqdnproxy.observe import gc_pauses


def test_every_collection_is_timed_by_generation() -> None:
    registry = CollectorRegistry()
    recorder = gc_pauses.GcPauseRecorder(registry).install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        recorder.remove()
    count = "fqdnproxy_python_gc_pause_seconds_count"
    assert registry.get_sample_value(count, {"generation": "0"}) >= 1
    assert registry.get_sample_value(count, {"generation": "2"}) >= 1
    assert registry.get_sample_value("fqdnproxy_python_gc_pause_seconds_sum",
                                     {"generation": "2"}) > 0
    assert recorder not in gc.callbacks
    before = registry.get_sample_value(count, {"generation": "2"})
    gc.collect(2)  # removed: no longer counted
    assert registry.get_sample_value(count, {"generation": "2"}) == before


def test_freezing_moves_what_is_alive_out_of_later_collections() -> None:
    try:
        frozen = gc_pauses.freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert len(gc.get_objects(generation=2)) < frozen
    finally:
        gc.unfreeze()  # the test process is no agent: give its objects back
