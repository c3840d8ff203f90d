"""Drop events into audit records: the per-endpoint token bucket and the suppressed counts."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable
from typing import Any

from fqdnproxy.datapath.events import DropEvent
from fqdnproxy.datapath.maps import Reason
from fqdnproxy.observe import drops
from fqdnproxy.observe.audit import DropRecord, DropSummaryRecord
from fqdnproxy.observe.metrics import Metrics
from tests.support.audit_schema import RecordingAudit, validate

WEB = {"id": 7, "namespace": "demo", "name": "web", "labels": {"app": "web"}}


def _event(endpoint_id: int = 7, reason: Reason = Reason.DROP_NO_ENTRY, audited: bool = False,
           protocol: int = 6, destination: str = "203.0.113.6") -> DropEvent:
    return DropEvent(timestamp_ns=1, endpoint_id=endpoint_id, reason=reason, ifindex=3,
                     protocol=protocol, source=ipaddress.ip_address("192.0.2.10"),
                     destination=ipaddress.ip_address(destination), sport=40000, dport=8080,
                     audited=audited)


def _identity(endpoint_id: int) -> dict[str, Any] | None:
    return WEB if endpoint_id == 7 else None


def test_record_fields_and_schema() -> None:
    limiter = drops.DropLimiter(rate=10, burst=5, identity=_identity)
    record = limiter.offer(_event(), wall=1_700_000_000.5, now=0.0)
    assert isinstance(record, DropRecord)
    document = json.loads(json.dumps(record.to_dict()))
    validate(document)
    assert document == {
        "time": "2023-11-14T22:13:20.500000Z", "type": "drop", "endpoint": WEB, "endpoint_id": 7,
        "source": {"ip": "192.0.2.10", "port": 40000},
        "destination": {"ip": "203.0.113.6", "port": 8080},
        "protocol": "tcp", "reason": "no_entry", "verdict": "dropped", "suppressed": 0}
    audited = limiter.offer(_event(8, Reason.DROP_PORT, audited=True, protocol=17,
                                   destination="2001:db8::1"), wall=1.0, now=0.0)
    assert audited is not None
    document = audited.to_dict()
    validate(json.loads(json.dumps(document)))
    assert (document["verdict"], document["reason"], document["protocol"], document["endpoint"]) \
        == ("audit", "port", "udp", None)


def test_burst_then_rate_and_the_suppressed_count_in_the_next_record() -> None:
    limiter = drops.DropLimiter(rate=2, burst=3, identity=_identity)
    out = [limiter.offer(_event(), wall=0.0, now=0.0) for _ in range(10)]
    assert sum(r is not None for r in out) == 3  # the burst
    assert limiter.offer(_event(8), wall=0.0, now=0.0) is not None  # buckets are per endpoint
    assert limiter.offer(_event(), wall=0.1, now=0.1) is None  # 0.2 tokens: not yet
    later = limiter.offer(_event(), wall=0.5, now=0.5)  # one token after 0.5 s at 2/s
    assert later is not None and later.suppressed == 8
    assert limiter.offer(_event(), wall=1.0, now=1.0) is not None
    assert limiter.offer(_event(), wall=1.0, now=1.0) is None


def test_summary_for_what_no_later_record_reported() -> None:
    limiter = drops.DropLimiter(rate=1, burst=1, identity=_identity, summary_interval=10)
    assert limiter.offer(_event(), wall=100.0, now=0.0) is not None
    for _ in range(4):
        assert limiter.offer(_event(), wall=100.2, now=0.2) is None
    assert limiter.summaries(wall=105.0) == []
    [summary] = limiter.summaries(wall=110.2)
    assert isinstance(summary, DropSummaryRecord)
    document = json.loads(json.dumps(summary.to_dict()))
    validate(document)
    assert (document["type"], document["suppressed"], document["endpoint_id"]) == \
        ("drop_summary", 4, 7)
    assert document["since"].startswith("1970-01-01T00:01:40.2")
    assert limiter.summaries(wall=200.0) == []  # reported once
    # The next record does not count them again.
    record = limiter.offer(_event(), wall=200.0, now=100.0)
    assert record is not None and record.suppressed == 0


def test_flush_and_idle_buckets_are_forgotten() -> None:
    limiter = drops.DropLimiter(rate=1, burst=1, identity=_identity)
    limiter.offer(_event(), wall=0.0, now=0.0)
    limiter.offer(_event(), wall=0.0, now=0.0)
    limiter.offer(_event(9), wall=0.0, now=0.0)
    limiter.forget_idle(now=100.0)
    assert set(limiter._buckets) == {7}  # 7 still has a pending count
    assert [(s.endpoint_id, s.suppressed) for s in limiter.flush(wall=1.0)] == [(7, 1)]
    limiter.forget_idle(now=100.0)
    assert limiter._buckets == {}


class FakeReader:
    """What ``EgressDatapath.drop_events(sink)`` returns: poll() hands queued events to sink."""

    def __init__(self, sink: Callable[[DropEvent], None]) -> None:
        self.sink = sink
        self.queued: list[DropEvent] = []
        self.lock = threading.Lock()
        self.polled = threading.Event()

    def poll(self, timeout_ms: int = 0) -> list[DropEvent]:
        with self.lock:
            events, self.queued = self.queued, []
        for event in events:
            self.sink(event)
        self.polled.set()
        if not events:
            threading.Event().wait(timeout_ms / 1000 / 10)
        return []


class FakeDatapath:
    def __init__(self) -> None:
        self.reader: FakeReader | None = None

    def drop_events(self, sink: Callable[[DropEvent], None]) -> FakeReader:
        self.reader = FakeReader(sink)
        return self.reader


def test_auditor_reads_on_its_own_thread_and_flushes_at_stop() -> None:
    datapath = FakeDatapath()
    audit = RecordingAudit()
    metrics = Metrics()
    limiter = drops.DropLimiter(rate=0.001, burst=2, identity=_identity)
    auditor = drops.DropAuditor(datapath, audit, limiter, metrics).start()
    try:
        assert datapath.reader is not None
        with datapath.reader.lock:
            datapath.reader.queued += [_event() for _ in range(5)]
            datapath.reader.queued.append(_event(reason=Reason.EVENT_SUPPRESSED))
        datapath.reader.polled.clear()
        assert datapath.reader.polled.wait(5)
        datapath.reader.polled.clear()
        assert datapath.reader.polled.wait(5)  # a full poll after the events were handed over
    finally:
        auditor.stop()
    assert [r.type for r in audit.records] == ["drop", "drop", "drop_summary"]
    assert audit.records[-1].suppressed == 3
    assert metrics.drop_events.labels("logged")._value.get() == 2
    assert metrics.drop_events.labels("suppressed")._value.get() == 3
