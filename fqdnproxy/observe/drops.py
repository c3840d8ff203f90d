"""Datapath drop events into the audit log, rate-limited per endpoint, nothing lost uncounted.

    kernel ring buffer ──► poll thread ──► per-endpoint token bucket ──► DropRecord ──► audit log
     (≤ FQDN_EVENTS_PER_SEC                      │ empty: suppressed += 1
      per endpoint; the rest                     └─► reported in the endpoint's next DropRecord
      bump EVENT_SUPPRESSED)                         (``suppressed``), or after SUMMARY_INTERVAL
                                                     in a DropSummaryRecord

The ring buffer is read by ``DropAuditor``'s own thread (bcc's ``ring_buffer_poll`` blocks in
epoll, outside the GIL), so the event loop never waits on it. The audit sink's ``emit`` only
appends to a bounded deque, which is safe from any thread. A pod hammering a blocked address
costs at most ``rate`` records a second (plus ``burst``) and a summary every interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fqdnproxy.datapath.allowmap import kernel_now_ns
from fqdnproxy.datapath.events import DropEvent
from fqdnproxy.datapath.maps import Reason
from fqdnproxy.observe.audit import DropRecord, DropSummaryRecord
from fqdnproxy.observe.datapath_metrics import reason_label

log = logging.getLogger(__name__)

NS = 1_000_000_000
SUMMARY_INTERVAL = 10.0  # s; pending suppressed counts older than this get a summary record
POLL_TIMEOUT_MS = 200  # the poll thread notices a stop within this
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


class RecordSink(Protocol):
    def emit(self, record: Any) -> None: ...


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take(now)`` spends one if there is one. O(1)."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Pending:
    """An endpoint's suppressed events not reported yet, and when the first of them happened."""

    count: int = 0
    since: float = 0.0  # wall clock


class DropLimiter:
    """Turns drop events into records: per-endpoint token buckets and suppressed counts.

    Pure (time is passed in), so it is tested without a kernel. One thread uses it.
    """

    def __init__(self, rate: float, burst: float,
                 identity: Callable[[int], dict[str, Any] | None],
                 summary_interval: float = SUMMARY_INTERVAL) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._identity = identity
        self._summary_interval = summary_interval
        self._buckets: dict[int, TokenBucket] = {}
        self._pending: dict[int, _Pending] = {}

    def offer(self, event: DropEvent, wall: float, now: float) -> DropRecord | None:
        """The record for ``event`` (at wall-clock ``wall``), or None when it is suppressed.

        ``now`` is a monotonic time in seconds for the buckets.
        """
        endpoint_id = event.endpoint_id
        bucket = self._buckets.get(endpoint_id)
        if bucket is None:
            bucket = self._buckets[endpoint_id] = TokenBucket(self._rate, self._burst, now)
        if not bucket.take(now):
            pending = self._pending.get(endpoint_id)
            if pending is None:
                pending = self._pending[endpoint_id] = _Pending(0, wall)
            pending.count += 1
            return None
        pending = self._pending.pop(endpoint_id, None)
        return DropRecord(
            time=wall,
            endpoint=self._identity(endpoint_id),
            endpoint_id=endpoint_id,
            source=(str(event.source), event.sport),
            destination=(str(event.destination), event.dport),
            protocol=PROTOCOLS.get(event.protocol, str(event.protocol)),
            reason=reason_label(event.reason),
            verdict="audit" if event.audited else "dropped",
            suppressed=pending.count if pending is not None else 0,
        )

    def summaries(self, wall: float) -> list[DropSummaryRecord]:
        """Summary records for suppressed counts pending longer than the interval."""
        due = [eid for eid, p in self._pending.items() if wall - p.since >= self._summary_interval]
        out = []
        for endpoint_id in due:
            pending = self._pending.pop(endpoint_id)
            out.append(DropSummaryRecord(wall, self._identity(endpoint_id), endpoint_id,
                                         pending.count, pending.since))
        return out

    def flush(self, wall: float) -> list[DropSummaryRecord]:
        """Summaries for everything pending (at a stop)."""
        out = [DropSummaryRecord(wall, self._identity(eid), eid, p.count, p.since)
               for eid, p in self._pending.items()]
        self._pending.clear()
        return out

    def forget_idle(self, now: float) -> None:
        """Drop buckets that are full again (bounded memory as endpoints come and go)."""
        full = [eid for eid, b in self._buckets.items()
                if eid not in self._pending and (now - b.updated) * b.rate + b.tokens >= b.burst]
        for endpoint_id in full:
            del self._buckets[endpoint_id]


class DropAuditor:
    """Reads a datapath's drop events on a thread and writes them to ``sink`` as records."""

    def __init__(self, datapath: Any, sink: RecordSink, limiter: DropLimiter,
                 metrics: Any = None) -> None:
        self._limiter = limiter
        self._sink = sink
        self._metrics = metrics
        self._stop = threading.Event()
        self._offset = 0.0  # wall clock minus kernel clock, seconds
        self._reader = datapath.drop_events(self._on_event)
        self._thread = threading.Thread(target=self._run, name="drop-events", daemon=True)

    def start(self) -> DropAuditor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (within POLL_TIMEOUT_MS), then report what is still pending."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        for record in self._limiter.flush(time.time()):
            self._sink.emit(record)

    def _run(self) -> None:
        last_summary = time.monotonic()
        while not self._stop.is_set():
            self._offset = time.time() - kernel_now_ns() / NS
            try:
                self._reader.poll(POLL_TIMEOUT_MS)
            except Exception:  # a bad event must not end drop logging for good
                log.exception("reading drop events failed")
                self._stop.wait(1.0)
            now = time.monotonic()
            if now - last_summary >= 1.0:
                last_summary = now
                for record in self._limiter.summaries(time.time()):
                    self._sink.emit(record)
                self._limiter.forget_idle(now)

    def _on_event(self, event: DropEvent) -> None:
        if event.reason == Reason.EVENT_SUPPRESSED:
            return
        record = self._limiter.offer(event, event.timestamp_ns / NS + self._offset,
                                     time.monotonic())
        if self._metrics is not None:
            outcome = "suppressed" if record is None else "logged"
            self._metrics.child(self._metrics.drop_events, outcome).inc()
        if record is not None:
            self._sink.emit(record)
