"""Audit records and the JSON-lines sink.

Every exchange the proxy finishes yields exactly one ``AuditRecord``; its ``type`` says how the
exchange ended: ``answer`` (an upstream answer was released), ``query`` (the proxy answered itself
or not at all: refused, SERVFAIL, FORMERR, upstream timeout). The record carries the query, the
verdict and, for answers, the rcode, the answer records and the CNAME chain. Packets the datapath
drops are records of their own: ``DropRecord`` (``drop``) and ``DropSummaryRecord``
(``drop_summary``), written by ``observe.drops``.

The hot path renders the record into one JSON line (orjson; a few microseconds) and appends it to
a bounded deque; a writer thread joins the lines and writes them, so a slow disk never stalls
DNS. When the deque is full the line is dropped and counted (``fqdnproxy_audit_records_dropped``):
losing an audit line is bad, blocking every pod's DNS is worse.

Why render on the emitting thread and not on the writer: Python threads share one interpreter
lock, and a writer thread busy with Python (building dicts) holds it in slices of up to
``sys.getswitchinterval()`` (5 ms) while the event loop waits for it, every time the loop gives it
up for a system call. Measured under dnsperf (benchmarks/dns_compare.py's load), rendering on the
writer cost half the proxy's throughput and most of its latency. The writer thread now only
joins bytes and calls ``write``, which releases the lock.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

import orjson

from fqdnproxy.dns import wire
from fqdnproxy.exchange import AllowedIp
from fqdnproxy.observe.metrics import Metrics


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One finished exchange. Field names are the JSON keys; see README "Audit records"."""

    time: float  # seconds since the epoch, rendered as RFC 3339 UTC
    type: str  # "query" or "answer"
    protocol: str  # "udp" or "tcp"
    source: tuple[str, int]
    server: tuple[str, int] | None
    query_name: str
    query_type: str
    query_class: int
    query_id: int
    verdict: str  # "allowed", "denied", "overload", "malformed", "no-endpoint"
    reason: str  # the rule that decided, or why the proxy answered itself
    rcode: str | None  # rcode released to the client; None when nothing was released
    latency: float  # seconds from receipt to release
    answers: tuple[wire.Record, ...] = ()  # rendered by the writer thread, not the hot path
    cnames: tuple[str, ...] = ()
    endpoint: dict[str, Any] | None = None
    allowed_ips: tuple[AllowedIp, ...] = ()  # what the answer let the endpoint reach
    # The messages as the client sent and received them (client's ID), for dnstap; not in JSON.
    query_message: bytes = b""
    response_message: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the log (ECS mapping in the README)."""
        return {
            "time": _rfc3339(self.time),
            "type": self.type,
            "endpoint": self.endpoint,
            "source": {"ip": self.source[0], "port": self.source[1]},
            "server": {"ip": self.server[0], "port": self.server[1]} if self.server else None,
            "protocol": self.protocol,
            "query": {"name": self.query_name, "type": self.query_type,
                      "class": self.query_class, "id": self.query_id},
            "verdict": self.verdict,
            "reason": self.reason,
            "rcode": self.rcode,
            "answers": [
                {"name": a.name, "type": wire.qtype_name(a.rtype), "ttl": a.ttl, "data": a.data}
                for a in self.answers
            ],
            "cnames": list(self.cnames),
            "allowed": [{"ip": a.ip, "expires": _rfc3339(a.expires), "ports": a.ports}
                        for a in self.allowed_ips],
            "latency_ms": round(self.latency * 1000.0, 3),
        }


@dataclass(frozen=True, slots=True)
class DropRecord:
    """A packet the datapath dropped (or, in audit mode, would have dropped and passed).

    ``suppressed`` counts this endpoint's drop events the audit rate limit left out since its
    previous drop record (``observe.drops``). README "Audit records" has the fields.
    """

    time: float  # seconds since the epoch (the kernel's timestamp of the packet)
    endpoint: dict[str, Any] | None  # None when the id is no longer in the inventory
    endpoint_id: int
    source: tuple[str, int]
    destination: tuple[str, int]
    protocol: str  # "tcp", "udp", "icmp", "icmpv6" or the IP protocol number
    reason: str  # datapath reason: no_entry, expired, port, spoofed, malformed, icmp
    verdict: str  # "dropped", or "audit": the endpoint is in audit mode and the packet passed
    suppressed: int = 0
    type: str = "drop"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the log."""
        return {
            "time": _rfc3339(self.time),
            "type": self.type,
            "endpoint": self.endpoint,
            "endpoint_id": self.endpoint_id,
            "source": {"ip": self.source[0], "port": self.source[1]},
            "destination": {"ip": self.destination[0], "port": self.destination[1]},
            "protocol": self.protocol,
            "reason": self.reason,
            "verdict": self.verdict,
            "suppressed": self.suppressed,
        }


@dataclass(frozen=True, slots=True)
class DropSummaryRecord:
    """Drop events of one endpoint that the audit rate limit left out and no later drop record
    reported, written periodically so every suppressed event is reported once."""

    time: float
    endpoint: dict[str, Any] | None
    endpoint_id: int
    suppressed: int
    since: float  # seconds since the epoch: the first suppressed event this record covers
    type: str = "drop_summary"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the log."""
        return {
            "time": _rfc3339(self.time),
            "type": self.type,
            "endpoint": self.endpoint,
            "endpoint_id": self.endpoint_id,
            "suppressed": self.suppressed,
            "since": _rfc3339(self.since),
        }


class _Rfc3339:
    """RFC 3339 UTC timestamps with microseconds; the date part is formatted once a second.

    Called from more than one thread (the loop, the drop-event reader): the second and its text
    are one tuple, swapped in one assignment, so a reader never pairs a second with another's text.
    """

    def __init__(self) -> None:
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, timestamp: float) -> str:
        second = int(timestamp)
        cached = self._cached
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._cached = cached
        return f"{cached[1]}.{int((timestamp - second) * 1_000_000):06d}Z"


_rfc3339 = _Rfc3339()


class AuditSink(Protocol):
    """Where the proxy sends finished exchanges."""

    def emit(self, record: AuditRecord) -> None:
        """Queue one record; never blocks. (The JSON-lines sink also takes ``DropRecord`` and
        ``DropSummaryRecord``; dnstap sinks never get them: they are not DNS messages.)"""


class TeeAuditSink:
    """Hands each record to several sinks (JSON lines and dnstap, say)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self._sinks = sinks

    def emit(self, record: AuditRecord) -> None:
        for sink in self._sinks:
            sink.emit(record)

    def close(self) -> None:
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class NullAuditSink:
    """Audit disabled (``audit.path: ''``)."""

    def emit(self, record: AuditRecord) -> None:
        return None

    def close(self) -> None:
        return None


class JsonLinesAuditLog:
    """Writes records as JSON lines to a file or stdout; rendered by ``emit``, written by a
    writer thread (see the module docstring for why).

    ``reopen()`` (called on SIGHUP) reopens the file so logrotate can move it away.
    """

    POLL_INTERVAL = 0.02  # s; the writer's sleep when idle, bounding a record's delay to disk

    def __init__(self, path: str, queue_size: int, metrics: Metrics) -> None:
        self._path = path
        self._lines: collections.deque[bytes] = collections.deque()
        self._queue_size = queue_size
        self._metrics = metrics
        self._reopen = threading.Event()
        self._stop = threading.Event()
        self._stream: IO[bytes] = self._open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def emit(self, record: AuditRecord | DropRecord | DropSummaryRecord) -> None:
        """Render one record and queue its line, or drop and count it when the queue is full.
        Any thread (the loop's, the drop-event reader's); ``deque.append`` is atomic."""
        if len(self._lines) >= self._queue_size:
            self._metrics.audit_dropped.inc()
            return
        self._lines.append(orjson.dumps(record.to_dict(), option=orjson.OPT_APPEND_NEWLINE))

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGHUP)."""
        self._reopen.set()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._drain()
        if self._stream is not sys.stdout.buffer:
            self._stream.close()

    def _open(self) -> IO[bytes]:
        if self._path == "-":
            return sys.stdout.buffer
        return open(self._path, "ab")  # a batch bigger than the buffer goes straight through

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._reopen.is_set():
                self._reopen.clear()
                if self._stream is not sys.stdout.buffer:
                    self._stream.close()
                self._stream = self._open()
            if not self._drain():
                time.sleep(self.POLL_INTERVAL)

    def _drain(self) -> int:
        lines = self._lines
        batch = [lines.popleft() for _ in range(len(lines))]
        if batch:
            try:
                self._stream.write(b"".join(batch))
                self._stream.flush()
            except OSError:
                # A full disk must not kill the writer; the lines are lost and counted.
                self._metrics.audit_dropped.inc(len(batch))
        self._metrics.audit_queue.set(len(lines))
        return len(batch)
