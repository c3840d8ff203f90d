"""Audit records and the JSON-lines sink.

Every exchange the proxy finishes yields exactly one ``AuditRecord``; its ``type`` says how the
exchange ended: ``answer`` (an upstream answer was released), ``query`` (the proxy answered itself
or not at all: refused, SERVFAIL, FORMERR, upstream timeout). The record carries the query, the
verdict and, for answers, the rcode, the answer records and the CNAME chain. Packets the datapath
drops are records of their own: ``DropRecord`` (``drop``) and ``DropSummaryRecord``
(``drop_summary``), written by ``observe.drops``.

The hot path renders the record into one JSON line (``AuditRenderer``: orjson, with a repeated
answer's JSON and each second's date text remembered; a few microseconds) and appends it to
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
from typing import IO, Any, NamedTuple, Protocol

import orjson

from fqdnproxy.dns import wire
from fqdnproxy.exchange import AllowedIp
from fqdnproxy.memo import BoundedMemo
from fqdnproxy.observe.metrics import Metrics


class AuditRecord(NamedTuple):
    """One finished exchange. Field names are the JSON keys; see README "Audit records".

    A named tuple rather than a frozen dataclass: one is made per query, and ``fast`` builds it
    in one C call where a dataclass needs a store per field (19 of them: 0.64 against 1.38 µs).
    """

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
    answers: tuple[wire.Record, ...] = ()  # the parse cache's tuple: its JSON is remembered
    cnames: tuple[str, ...] = ()
    endpoint: dict[str, Any] | None = None
    allowed_ips: tuple[AllowedIp, ...] = ()  # what the answer let the endpoint reach
    # The messages as the client sent and received them (client's ID), for dnstap; not in JSON.
    query_message: bytes = b""
    response_message: bytes | None = None

    @classmethod
    def fast(cls, *, time: float, type: str, protocol: str, source: tuple[str, int],
             server: tuple[str, int] | None, query_name: str, query_type: str, query_class: int,
             query_id: int, verdict: str, reason: str, rcode: str | None, latency: float,
             answers: tuple[wire.Record, ...] = (), cnames: tuple[str, ...] = (),
             endpoint: dict[str, Any] | None = None, allowed_ips: tuple[AllowedIp, ...] = (),
             query_message: bytes = b"", response_message: bytes | None = None) -> AuditRecord:
        """The same record as the constructor's, for the query path: without the named tuple's
        Python-level ``__new__`` (the fields in declaration order: a test checks)."""
        return _new_tuple(cls, (time, type, protocol, source, server, query_name, query_type,
                                query_class, query_id, verdict, reason, rcode, latency, answers,
                                cnames, endpoint, allowed_ips, query_message, response_message))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the log (ECS mapping in the README). The log itself
        renders through ``AuditRenderer``, which writes the same bytes faster."""
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


_new_tuple = tuple.__new__


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

ANSWERS_MEMO_SIZE = 4096  # answers; as many as the parse cache remembers by default
ENDPOINTS_MEMO_SIZE = 1024  # endpoint identities: more than the pods of one node
DATES_MEMO_SIZE = 1024  # seconds: the current one and those a TTL ahead (allowed IPs' expiry)


class AuditRenderer:
    """Renders an ``AuditRecord`` into its JSON line: the bytes of
    ``orjson.dumps(record.to_dict(), option=orjson.OPT_APPEND_NEWLINE)``, for less CPU.

    The saving is in Python work not done; orjson's own share is unchanged:

    - ``answers``: the parse cache hands out one tuple of records per distinct answer, so a
      repeated answer's JSON is rendered once and inserted as an ``orjson.Fragment``. Keyed by
      the tuple's id with the tuple held in the entry: while the entry lives no other object
      can have that id, and the tuple and its records are frozen, so the text stays true.
      Hashing the tuple instead would hash every field of every record (and compare them all
      on a hit), where an id costs nothing. A tuple equal to one remembered but not the same
      object misses.
    - ``dates``: the "YYYY-MM-DDTHH:MM:SS" of a second, as a %-template for the microseconds.
      A record's time and its allowed IPs' expiry (a TTL later) fall in different seconds, so
      ``_Rfc3339``'s one-second cache missed twice per answer (gmtime and strftime each time).
      The record's time still gets a one-second slot in front of the memo (records come in
      time order), and an answer's IPs mostly share one expiry, formatted once.
    - ``endpoint``: each ``Endpoint`` makes its identity dict once and every record of the
      endpoint carries that dict, so its JSON is remembered by the dict's id, held in the
      entry, as the answers' is.
    - ``cnames`` is written from the tuple (orjson writes tuples as arrays), without a list.

    The memos are ``BoundedMemo``s (FIFO, capped, counted: ``fqdnproxy_audit_memo_*``). Not
    thread-safe: only the loop's thread emits ``AuditRecord``s (drop records, from the drop
    reader, go through ``to_dict``).
    """

    def __init__(self, answers_size: int = ANSWERS_MEMO_SIZE,
                 dates_size: int = DATES_MEMO_SIZE,
                 endpoints_size: int = ENDPOINTS_MEMO_SIZE) -> None:
        # id(answers) -> (answers, their JSON); the tuple held so its id stays its own.
        self._answers: BoundedMemo[int, tuple[tuple[wire.Record, ...], orjson.Fragment]] = (
            BoundedMemo(answers_size))
        self._dates: BoundedMemo[int, str] = BoundedMemo(dates_size)
        # id(identity) -> (identity, its JSON); the dict held so its id stays its own.
        self._endpoints: BoundedMemo[int, tuple[dict[str, Any], orjson.Fragment]] = (
            BoundedMemo(endpoints_size))
        self._now: tuple[int, str] = (-1, "")  # the last record time's second and its template

    def memos(self) -> dict[str, BoundedMemo[Any, Any]]:
        """The memos by name ("answers", "dates", "endpoints"), for metrics."""
        return {"answers": self._answers, "dates": self._dates, "endpoints": self._endpoints}

    def render(self, record: AuditRecord) -> bytes:
        """The record's JSON line, newline included."""
        timestamp = record.time
        second = int(timestamp)
        now = self._now
        if now[0] != second:
            now = self._now = (second, self._date(second))
        source = record.source
        server = record.server
        allowed = record.allowed_ips
        return orjson.dumps({
            # As _rfc3339: %d truncates the float as int() does.
            "time": now[1] % ((timestamp - second) * 1_000_000),
            "type": record.type,
            "endpoint": self._endpoint_json(record.endpoint),
            "source": {"ip": source[0], "port": source[1]},
            "server": {"ip": server[0], "port": server[1]} if server else None,
            "protocol": record.protocol,
            "query": {"name": record.query_name, "type": record.query_type,
                      "class": record.query_class, "id": record.query_id},
            "verdict": record.verdict,
            "reason": record.reason,
            "rcode": record.rcode,
            "answers": self._answers_json(record.answers),
            "cnames": record.cnames,
            "allowed": self._allowed_json(allowed) if allowed else allowed,  # () is written []
            "latency_ms": round(record.latency * 1000.0, 3),
        }, option=orjson.OPT_APPEND_NEWLINE)

    def _answers_json(self, answers: tuple[wire.Record, ...]) -> Any:
        if type(answers) is not tuple:  # not from a parse: no id to trust
            return [_answer(a) for a in answers]
        if not answers:
            return answers  # written as []
        found = self._answers.get(id(answers))
        if found is not None and found[0] is answers:  # always, while held; cheap to check
            return found[1]
        fragment = orjson.Fragment(orjson.dumps([_answer(a) for a in answers]))
        self._answers.put(id(answers), (answers, fragment))
        return fragment

    def _endpoint_json(self, identity: dict[str, Any] | None) -> Any:
        if identity is None:
            return None
        found = self._endpoints.get(id(identity))
        if found is not None and found[0] is identity:  # always, while held
            return found[1]
        fragment = orjson.Fragment(orjson.dumps(identity))
        self._endpoints.put(id(identity), (identity, fragment))
        return fragment

    def _allowed_json(self, allowed: tuple[AllowedIp, ...]) -> list[dict[str, Any]]:
        out = []
        expires, text = None, ""
        for a in allowed:
            if a.expires != expires:  # equal floats format alike (0.0 and -0.0 included)
                expires = a.expires
                second = int(expires)
                text = self._date(second) % ((expires - second) * 1_000_000)
            out.append({"ip": a.ip, "expires": text, "ports": a.ports})
        return out

    def _date(self, second: int) -> str:
        """The %-template of ``second``'s RFC 3339 text, taking the microseconds."""
        template = self._dates.get(second)
        if template is None:
            template = time.strftime("%Y-%m-%dT%H:%M:%S.%%06dZ", time.gmtime(second))
            self._dates.put(second, template)
        return template


def _answer(record: wire.Record) -> dict[str, Any]:
    return {"name": record.name, "type": wire.qtype_name(record.rtype), "ttl": record.ttl,
            "data": record.data}


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
        self._renderer = AuditRenderer()
        metrics.watch_audit_renderer(self._renderer)
        self._reopen = threading.Event()
        self._stop = threading.Event()
        self._stream: IO[bytes] = self._open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def emit(self, record: AuditRecord | DropRecord | DropSummaryRecord) -> None:
        """Render one record and queue its line, or drop and count it when the queue is full.
        Any thread (``AuditRecord``s the loop's, drop records the drop-event reader's: the
        renderer's memos are the loop's alone); ``deque.append`` is atomic."""
        if len(self._lines) >= self._queue_size:
            self._metrics.audit_dropped.inc()
            return
        if type(record) is AuditRecord:
            self._lines.append(self._renderer.render(record))
        else:
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
