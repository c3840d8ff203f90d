"""The dnstap sink: each audit record as dnstap messages over Frame Streams (file or socket).

One record becomes a CLIENT_QUERY message and, when the client got a reply, a CLIENT_RESPONSE
message, each in its own ``Dnstap`` frame. Field numbers are dnstap.proto's (dnstap/dnstap.pb);
the protobuf is encoded by hand, a few varints and length-delimited fields, no dependency.

Where fqdnproxy puts what (README "dnstap"):

    Dnstap.identity        the agent's identity: the host name, unless ``identity`` is given
    Dnstap.version         "fqdnproxy <version>"
    Dnstap.extra           the endpoint, "namespace/name" (absent when unknown): dnstap's field
                           for an annotation of the payload; Policy.value is left out because
                           it holds the value the policy matched, in a format Policy.match sets
    Message.query_*        the client (record.source); socket family and protocol from it
    Message.query_time     receipt (record.time - record.latency)
    Message.response_time  release (record.time)
    Message.response_*     address and port left out: records do not carry the listener's
    Message.policy         type "fqdnproxy", rule = record.reason, action and match below

    verdict                  reply sent               Policy.action  Policy.match
    allowed                  any, or none (timeout)   PASS           QNAME
    audit (let through)      any, or none (timeout)   PASS           QNAME
    any other                none                     DROP           QNAME for denied,
                             NXDOMAIN                 NXDOMAIN       CLIENT_IP for no-endpoint,
                             NOERROR                  NODATA         absent for overload,
                             REFUSED, SERVFAIL, ...   LOCAL_DATA     malformed and error (not
                                                                     policy decisions)

An allowed query whose upstream timed out keeps PASS: the policy let it through, and the
missing CLIENT_RESPONSE shows that the client got nothing.

Like the JSON-lines log, ``emit`` only appends to a bounded deque; the writer thread encodes
and writes. A full deque, a socket with no reader and a failed write all drop frames and count
them in ``fqdnproxy_dnstap_frames_dropped_total``; the socket is retried with backoff.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time

import fqdnproxy
from fqdnproxy.observe import framestreams
from fqdnproxy.observe.audit import AuditRecord
from fqdnproxy.observe.metrics import Metrics

CONTENT_TYPE = b"protobuf:dnstap.Dnstap"

# dnstap.proto field numbers and enum values.
DNSTAP_IDENTITY, DNSTAP_VERSION, DNSTAP_EXTRA, DNSTAP_MESSAGE, DNSTAP_TYPE = 1, 2, 3, 14, 15
DNSTAP_TYPE_MESSAGE = 1
(MSG_TYPE, MSG_SOCKET_FAMILY, MSG_SOCKET_PROTOCOL, MSG_QUERY_ADDRESS, MSG_RESPONSE_ADDRESS,
 MSG_QUERY_PORT, MSG_RESPONSE_PORT, MSG_QUERY_TIME_SEC, MSG_QUERY_TIME_NSEC, MSG_QUERY_MESSAGE,
 MSG_QUERY_ZONE, MSG_RESPONSE_TIME_SEC, MSG_RESPONSE_TIME_NSEC, MSG_RESPONSE_MESSAGE,
 MSG_POLICY) = range(1, 16)
CLIENT_QUERY, CLIENT_RESPONSE = 5, 6
INET, INET6 = 1, 2
SOCKET_PROTOCOLS = {"udp": 1, "tcp": 2}
POLICY_TYPE, POLICY_RULE, POLICY_ACTION, POLICY_MATCH, POLICY_VALUE = 1, 2, 3, 4, 5
ACTION_NXDOMAIN, ACTION_NODATA, ACTION_PASS, ACTION_DROP, ACTION_LOCAL_DATA = 1, 2, 3, 4, 6
MATCH_QNAME, MATCH_CLIENT_IP = 1, 2

POLICY_TYPE_NAME = b"fqdnproxy"
_POLICY_MATCHES = {"allowed": MATCH_QNAME, "denied": MATCH_QNAME, "audit": MATCH_QNAME,
                   "no-endpoint": MATCH_CLIENT_IP}


# --- protobuf, by hand ------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)  # wire type 0


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _fixed32(field: int, value: int) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<I", value)


def _time(sec_field: int, nsec_field: int, timestamp: float) -> bytes:
    # A float of epoch seconds holds about a microsecond of fraction: round to that, not to
    # nanoseconds of noise.
    us = round(timestamp * 1_000_000)
    return _uint(sec_field, us // 1_000_000) + _fixed32(nsec_field, us % 1_000_000 * 1000)


# --- records to dnstap ------------------------------------------------------------------------


def policy_action(record: AuditRecord) -> int:
    """The dnstap Policy.Action for a record's verdict and reply (mapping in the docstring)."""
    if record.verdict in ("allowed", "audit"):  # audit: refused by policy, let through
        return ACTION_PASS
    if record.response_message is None:
        return ACTION_DROP
    if record.rcode == "NXDOMAIN":
        return ACTION_NXDOMAIN
    if record.rcode == "NOERROR":
        return ACTION_NODATA
    return ACTION_LOCAL_DATA


def encode_policy(record: AuditRecord) -> bytes:
    """The dnstap Policy message for a record."""
    out = (_bytes(POLICY_TYPE, POLICY_TYPE_NAME) + _bytes(POLICY_RULE, record.reason.encode())
           + _uint(POLICY_ACTION, policy_action(record)))
    match = _POLICY_MATCHES.get(record.verdict)
    if match is not None:
        out += _uint(POLICY_MATCH, match)
    return out


def endpoint_identity(record: AuditRecord) -> bytes:
    """``namespace/name`` of the record's endpoint, or empty when it is unknown."""
    endpoint = record.endpoint or {}
    namespace, name = endpoint.get("namespace"), endpoint.get("name")
    return f"{namespace}/{name}".encode() if namespace and name else b""


def _client(ip: str, port: int) -> bytes:
    """Socket family, query address and port; an address that will not pack is left out."""
    family, af = (INET6, socket.AF_INET6) if ":" in ip else (INET, socket.AF_INET)
    try:
        packed = socket.inet_pton(af, ip.partition("%")[0])  # no zone: dnstap has no field
    except OSError:
        return _uint(MSG_SOCKET_FAMILY, family) + _uint(MSG_QUERY_PORT, port)
    return (_uint(MSG_SOCKET_FAMILY, family) + _bytes(MSG_QUERY_ADDRESS, packed)
            + _uint(MSG_QUERY_PORT, port))


class Encoder:
    """Turns audit records into dnstap payloads (one per message). Writer thread only."""

    def __init__(self, identity: str) -> None:
        self._header = (_bytes(DNSTAP_IDENTITY, identity.encode())
                        + _bytes(DNSTAP_VERSION, f"fqdnproxy {fqdnproxy.__version__}".encode()))

    def encode(self, record: AuditRecord) -> list[bytes]:
        """CLIENT_QUERY and, when a reply was sent, CLIENT_RESPONSE."""
        common = (_client(*record.source)
                  + _uint(MSG_SOCKET_PROTOCOL, SOCKET_PROTOCOLS.get(record.protocol, 1))
                  + _time(MSG_QUERY_TIME_SEC, MSG_QUERY_TIME_NSEC, record.time - record.latency))
        policy = _bytes(MSG_POLICY, encode_policy(record))
        header = self._header
        extra = endpoint_identity(record)
        if extra:
            header += _bytes(DNSTAP_EXTRA, extra)
        messages = [_uint(MSG_TYPE, CLIENT_QUERY) + common
                    + _bytes(MSG_QUERY_MESSAGE, record.query_message) + policy]
        if record.response_message is not None:
            messages.append(
                _uint(MSG_TYPE, CLIENT_RESPONSE) + common
                + _time(MSG_RESPONSE_TIME_SEC, MSG_RESPONSE_TIME_NSEC, record.time)
                + _bytes(MSG_RESPONSE_MESSAGE, record.response_message) + policy)
        tail = _uint(DNSTAP_TYPE, DNSTAP_TYPE_MESSAGE)
        return [header + _bytes(DNSTAP_MESSAGE, message) + tail for message in messages]


# --- the sink ---------------------------------------------------------------------------------


def open_sinks(file: str, socket_path: str, queue_size: int, metrics: Metrics) -> list[DnstapSink]:
    """A sink per configured output (``audit.dnstap_file``, ``audit.dnstap_socket``).

    Raises:
        OSError: the file could not be created.
    """
    sinks = []
    if file:
        sinks.append(DnstapSink(framestreams.FileWriter(file, CONTENT_TYPE), queue_size, metrics))
    if socket_path:
        sinks.append(DnstapSink(framestreams.SocketWriter(socket_path, CONTENT_TYPE), queue_size,
                                metrics))
    return sinks



class DnstapSink:
    """An ``AuditSink`` writing dnstap through a Frame Streams writer from its own thread.

    ``writer`` is a ``framestreams.FileWriter`` (opened here, so a bad path fails startup, and
    given up after a failed write) or a ``framestreams.SocketWriter`` (connected by the thread
    and reconnected with backoff whenever the reader is absent or goes away).

    Raises:
        OSError: the file could not be created.
    """

    POLL_INTERVAL = 0.02  # s; the writer's sleep when idle
    RETRY_MIN = 0.1  # s; first wait before reconnecting to the socket, doubled per failure
    RETRY_MAX = 5.0  # s
    BATCH = 512  # records per write

    def __init__(self, writer: framestreams.FileWriter | framestreams.SocketWriter,
                 queue_size: int, metrics: Metrics, identity: str | None = None) -> None:
        self._writer = writer
        self._queue: collections.deque[AuditRecord] = collections.deque()
        self._queue_size = queue_size
        self._encoder = Encoder(identity if identity is not None else socket.gethostname())
        self._written = metrics.dnstap_frames.labels(writer.name)
        self._dropped = {reason: metrics.dnstap_dropped.labels(writer.name, reason)
                         for reason in ("queue_full", "disconnected", "write_error")}
        self._stop = threading.Event()
        self._connected = False
        self._retry_at = 0.0
        self._retry_wait = self.RETRY_MIN
        if not writer.retries:
            writer.open()
            self._connected = True
        self._thread = threading.Thread(target=self._run, name=f"dnstap-{writer.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        """Whether the stream is open (for the socket: a reader accepted it)."""
        return self._connected

    def emit(self, record: AuditRecord) -> None:
        """Queue one record, or drop and count its frames when the queue is full."""
        if len(self._queue) >= self._queue_size:
            self._dropped["queue_full"].inc(_frames(record))
            return
        self._queue.append(record)

    def close(self) -> None:
        """Write what is queued, then end the stream (STOP; on a socket, wait for FINISH)."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._drain()
        if self._connected:
            try:
                self._writer.close()
            except OSError:
                self._writer.abort()
            self._connected = False

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._connected and time.monotonic() >= self._retry_at:
                self._connect()
            if not self._drain():
                self._stop.wait(self.POLL_INTERVAL)

    def _connect(self) -> None:
        try:
            self._writer.open()
        except OSError:
            self._retry_at = time.monotonic() + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, self.RETRY_MAX)
            return
        self._connected = True
        self._retry_wait = self.RETRY_MIN

    def _drain(self) -> int:
        """Write (or, with no stream, drop) what is queued; returns the records taken."""
        queue = self._queue
        taken = 0
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self.BATCH))]
            taken += len(batch)
            if not self._connected:
                self._dropped["disconnected"].inc(sum(map(_frames, batch)))
                continue
            payloads = [payload for record in batch for payload in self._encoder.encode(record)]
            try:
                self._writer.write(payloads)
            except OSError:
                # The reader went away or the disk is full: lose this batch, count it, retry.
                self._dropped["write_error"].inc(len(payloads))
                self._writer.abort()
                self._connected = False
                self._retry_at = (time.monotonic() + self._retry_wait if self._writer.retries
                                  else float("inf"))
                continue
            self._written.inc(len(payloads))
        return taken


def _frames(record: AuditRecord) -> int:
    """The frames a record becomes: the query, and the response when one was sent."""
    return 1 if record.response_message is None else 2
