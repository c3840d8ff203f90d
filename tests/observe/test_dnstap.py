"""The dnstap sink: read back by Debian's dnstap-ldns, by an in-test Frame Streams reader on a
unix socket, and by a tiny protobuf decoder written here from dnstap.proto (independent of the
encoder under test, and needed because dnstap-ldns 0.2 does not print Policy or extra)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from dnslib import DNSRecord

from fqdnproxy.observe import dnstap, framestreams
from fqdnproxy.observe.audit import AuditRecord
from fqdnproxy.observe.metrics import Metrics
from tests.conftest import require
from tests.integration.test_forwarding import close_rig, make_rig, question
from tests.support.dns_client import tcp_query, udp_query
from tests.support.fake_upstream import Behaviour

CONTENT_TYPE = b"protobuf:dnstap.Dnstap"
ACCEPT, START, STOP, READY, FINISH = 1, 2, 3, 4, 5


# --- an independent reader: Frame Streams and protobuf ----------------------------------------


def read_control(data: bytes, offset: int) -> tuple[int, list[bytes], int]:
    """Control frame at ``offset`` (escape included): its type, content types, next offset."""
    escape, length, kind = struct.unpack_from(">III", data, offset)
    assert escape == 0
    end = offset + 8 + length
    fields, at = [], offset + 12
    while at < end:
        field_type, field_length = struct.unpack_from(">II", data, at)
        assert field_type == 1  # CONTENT_TYPE
        fields.append(data[at + 8:at + 8 + field_length])
        at += 8 + field_length
    return kind, fields, end


def read_file_stream(data: bytes) -> list[bytes]:
    """The payloads of a unidirectional stream; asserts START(content type) ... STOP."""
    kind, fields, at = read_control(data, 0)
    assert (kind, fields) == (START, [CONTENT_TYPE])
    payloads = []
    while True:
        (length,) = struct.unpack_from(">I", data, at)
        if length == 0:
            kind, fields, at = read_control(data, at)
            assert (kind, fields, at) == (STOP, [], len(data))
            return payloads
        payloads.append(data[at + 4:at + 4 + length])
        at += 4 + length


def decode(buf: bytes) -> dict[int, list[int | bytes]]:
    """Protobuf fields by number: varints and fixed32 as ints, length-delimited as bytes."""
    fields: dict[int, list[int | bytes]] = {}
    at = 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            byte = buf[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while at < len(buf):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value: int | bytes = varint()
        elif wire_type == 2:
            length = varint()
            value, at = buf[at:at + length], at + length
        elif wire_type == 5:
            (value,), at = struct.unpack_from("<I", buf, at), at + 4
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def one(fields: dict[int, list[int | bytes]], number: int) -> int | bytes:
    (value,) = fields[number]
    return value


class FrameStreamsReader:
    """A bidirectional Frame Streams reader on a unix socket: one connection, then done.

    It answers READY with ACCEPT, collects data frames after START, and answers STOP with
    FINISH. ``close()`` makes it go away (listener and connection), as a restarted collector.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.ready_types: list[bytes] = []
        self.payloads: list[bytes] = []
        self.started = threading.Event()
        self.stopped = threading.Event()  # STOP received and FINISH sent
        self.got_payload = threading.Event()
        self._closing = False
        self._conn: socket.socket | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing:
            try:
                self._conn, _ = self._listener.accept()
                break
            except TimeoutError:
                continue
        else:
            return
        try:
            self._talk(self._conn)
        except OSError:
            pass  # closed under us by close()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        kind, self.ready_types = self._control(conn)
        assert kind == READY
        body = struct.pack(">I", ACCEPT) + struct.pack(">II", 1, len(CONTENT_TYPE)) + CONTENT_TYPE
        conn.sendall(struct.pack(">II", 0, len(body)) + body)
        kind, types = self._control(conn)
        assert (kind, types) == (START, [CONTENT_TYPE])
        self.started.set()
        while True:
            (length,) = struct.unpack(">I", self._exact(conn, 4))
            if length == 0:
                break
            self.payloads.append(self._exact(conn, length))
            self.got_payload.set()
        (control_length,) = struct.unpack(">I", self._exact(conn, 4))
        assert struct.unpack(">I", self._exact(conn, control_length)) == (STOP,)
        conn.sendall(struct.pack(">III", 0, 4, FINISH))
        self.stopped.set()

    def _control(self, conn: socket.socket) -> tuple[int, list[bytes]]:
        head = self._exact(conn, 8)
        (length,) = struct.unpack(">I", head[4:])
        kind, fields, _ = read_control(head + self._exact(conn, length), 0)
        return kind, fields

    @staticmethod
    def _exact(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError("writer closed")
            data += chunk
        return data

    def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            self._conn.shutdown(socket.SHUT_RDWR)
            self._conn.close()
        self._listener.close()
        self._thread.join(timeout=5.0)
        Path(self.path).unlink(missing_ok=True)


# --- records ----------------------------------------------------------------------------------


def record(verdict: str = "allowed", rcode: str | None = "NOERROR", reply: bool = True,
           source: tuple[str, int] = ("192.0.2.7", 40000), protocol: str = "udp",
           reason: str = "demo/allow-api", endpoint: dict | None = None) -> AuditRecord:
    query = question("api.test", qid=4242)
    response = query.reply()
    return AuditRecord(
        time=1_800_000_000.5, type="answer" if verdict == "allowed" else "query",
        protocol=protocol, source=source, server=("127.0.0.1", 53), query_name="api.test.",
        query_type="A", query_class=1, query_id=4242, verdict=verdict, reason=reason,
        rcode=rcode if reply else None, latency=0.25, endpoint=endpoint,
        query_message=query.pack(), response_message=response.pack() if reply else None)


def sample(metrics: Metrics, output: str, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"output": output, **labels}) or 0.0


def wait_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a sink's thread offers no event to wait on) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class FastRetrySink(dnstap.DnstapSink):
    RETRY_MIN = 0.01
    RETRY_MAX = 0.05


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "dnstap.sock"
    yield str(path)
    path.unlink(missing_ok=True)


# --- the file, read by dnstap-ldns -------------------------------------------------------------


async def test_dnstap_ldns_reads_what_the_proxy_produced(tmp_path: Path) -> None:
    reader = shutil.which("dnstap-ldns")
    require(reader is not None, "dnstap-ldns is not installed (Debian package dnstap-ldns)")
    rig = await make_rig(timeout=0.3)
    try:
        rig.upstream.add("api.test. 300 IN A 192.0.2.10")
        rig.upstream.behave("quiet.test.", Behaviour(silent=True))
        assert await udp_query(rig.v4, question("api.test", qid=777)) is not None
        assert await tcp_query(rig.v6, question("api.test", "AAAA", qid=778)) is not None
        assert await udp_query(rig.v4, question("quiet.test"), timeout=1.0) is None
    finally:
        await close_rig(rig)
    records = rig.audit.records
    assert [r.query_name for r in records] == ["api.test.", "api.test.", "quiet.test."]

    path = tmp_path / "proxy.dnstap"
    metrics = Metrics()
    sink = dnstap.DnstapSink(framestreams.FileWriter(str(path), dnstap.CONTENT_TYPE), 100,
                             metrics, identity="node-7")
    for r in records:
        sink.emit(r)
    sink.close()
    assert sample(metrics, "file", "fqdnproxy_dnstap_frames_written_total") == 5

    quiet = subprocess.run([reader, "-r", str(path)], capture_output=True, text=True, check=True)
    lines = [line.split(" ", 2)[2] for line in quiet.stdout.splitlines()]  # drop date and time
    v4_port, v6_port = records[0].source[1], records[1].source[1]
    assert [(line.split()[:2]) + line.split()[-3:] for line in lines] == [
        ["CQ", "127.0.0.1", '"api.test."', "IN", "A"],
        ["CR", "127.0.0.1", '"api.test."', "IN", "A"],
        ["CQ", "::1", '"api.test."', "IN", "AAAA"],
        ["CR", "::1", '"api.test."', "IN", "AAAA"],
        ["CQ", "127.0.0.1", '"quiet.test."', "IN", "A"],  # silence: no CLIENT_RESPONSE
    ]
    assert [line.split()[2] for line in lines] == ["UDP", "UDP", "TCP", "TCP", "UDP"]

    yaml = subprocess.run([reader, "-y", "-r", str(path)], capture_output=True, text=True,
                          check=True).stdout
    documents = [doc for doc in yaml.split("---\n") if doc.strip()]
    assert len(documents) == 5
    assert all('identity: "node-7"' in doc and 'version: "fqdnproxy ' in doc
               for doc in documents)
    assert "type: CLIENT_RESPONSE" in documents[1] and f"query_port: {v4_port}" in documents[1]
    assert "id: 777" in documents[1] and "api.test.\t300\tIN\tA\t192.0.2.10" in documents[1]
    assert "socket_family: INET6" in documents[2] and f"query_port: {v6_port}" in documents[2]
    assert "response_time" in documents[1] and "response_time" not in documents[4]


# --- what dnstap-ldns does not print: Policy and extra ----------------------------------------


@pytest.mark.parametrize("verdict, rcode, reply, action, match", [
    ("allowed", "NOERROR", True, dnstap.ACTION_PASS, dnstap.MATCH_QNAME),
    ("allowed", "SERVFAIL", True, dnstap.ACTION_PASS, dnstap.MATCH_QNAME),  # upstream failed
    ("allowed", None, False, dnstap.ACTION_PASS, dnstap.MATCH_QNAME),  # upstream timed out
    ("denied", "REFUSED", True, dnstap.ACTION_LOCAL_DATA, dnstap.MATCH_QNAME),
    ("denied", "NXDOMAIN", True, dnstap.ACTION_NXDOMAIN, dnstap.MATCH_QNAME),
    ("denied", "NOERROR", True, dnstap.ACTION_NODATA, dnstap.MATCH_QNAME),
    ("denied", None, False, dnstap.ACTION_DROP, dnstap.MATCH_QNAME),
    ("overload", "SERVFAIL", True, dnstap.ACTION_LOCAL_DATA, None),
    ("malformed", "NOTIMP", True, dnstap.ACTION_LOCAL_DATA, None),
])
def test_policy_carries_the_verdict_and_extra_the_endpoint(
        tmp_path: Path, verdict: str, rcode: str | None, reply: bool, action: int,
        match: int | None) -> None:
    path = tmp_path / "policy.dnstap"
    sink = dnstap.DnstapSink(framestreams.FileWriter(str(path), dnstap.CONTENT_TYPE), 10,
                             Metrics(), identity="node-7")
    endpoint = {"id": 10, "namespace": "demo", "name": "frontend", "labels": {}}
    sink.emit(record(verdict, rcode, reply, reason=f"rule for {verdict}", endpoint=endpoint))
    sink.close()
    frames = [decode(payload) for payload in read_file_stream(path.read_bytes())]
    assert len(frames) == (2 if reply else 1)
    for frame, message_type in zip(frames, (5, 6)):  # CLIENT_QUERY, CLIENT_RESPONSE
        assert one(frame, 15) == 1  # Dnstap.type MESSAGE
        assert one(frame, 1) == b"node-7"  # identity
        assert one(frame, 3) == b"demo/frontend"  # extra: the endpoint
        message = decode(one(frame, 14))  # type: ignore[arg-type]
        assert one(message, 1) == message_type
        assert one(message, 2) == 1 and one(message, 3) == 1  # INET, UDP
        assert one(message, 4) == socket.inet_aton("192.0.2.7") and one(message, 6) == 40000
        assert (one(message, 8), one(message, 9)) == (1_800_000_000, 250_000_000)  # receipt
        policy = decode(one(message, 15))  # type: ignore[arg-type]
        assert one(policy, 1) == b"fqdnproxy"
        assert one(policy, 2) == f"rule for {verdict}".encode()
        assert one(policy, 3) == action
        assert policy.get(4) == ([match] if match is not None else None)
        if message_type == 6:
            assert (one(message, 12), one(message, 13)) == (1_800_000_000, 500_000_000)
            assert DNSRecord.parse(one(message, 14)).header.id == 4242  # type: ignore[arg-type]
        else:
            assert DNSRecord.parse(one(message, 10)).header.id == 4242  # type: ignore[arg-type]
            assert 12 not in message and 14 not in message


def test_no_endpoint_means_no_extra_and_ipv6_packs_sixteen_bytes(tmp_path: Path) -> None:
    path = tmp_path / "v6.dnstap"
    sink = dnstap.DnstapSink(framestreams.FileWriter(str(path), dnstap.CONTENT_TYPE), 10,
                             Metrics())
    sink.emit(record(source=("2001:db8::7", 5353), protocol="tcp"))
    sink.close()
    frame = decode(read_file_stream(path.read_bytes())[0])
    assert 3 not in frame and one(frame, 1) == socket.gethostname().encode()
    message = decode(one(frame, 14))  # type: ignore[arg-type]
    assert one(message, 2) == 2 and one(message, 3) == 2  # INET6, TCP
    assert one(message, 4) == socket.inet_pton(socket.AF_INET6, "2001:db8::7")


def test_a_file_that_cannot_be_created_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        dnstap.DnstapSink(framestreams.FileWriter(str(tmp_path / "no" / "such.dnstap"),
                                                  dnstap.CONTENT_TYPE), 10, Metrics())


# --- the unix socket ---------------------------------------------------------------------------


def test_socket_handshake_frames_stop_and_finish(socket_path: str) -> None:
    reader = FrameStreamsReader(socket_path)
    metrics = Metrics()
    sink = dnstap.DnstapSink(framestreams.SocketWriter(socket_path, dnstap.CONTENT_TYPE), 100,
                             metrics, identity="node-7")
    try:
        assert reader.started.wait(5.0)
        assert reader.ready_types == [CONTENT_TYPE]
        sink.emit(record())
        sink.emit(record("denied", reply=False))
        sink.close()
        assert reader.stopped.wait(5.0)  # STOP came after the frames, and FINISH went back
    finally:
        reader.close()
    assert [one(decode(one(decode(p), 14)), 1) for p in reader.payloads] == [5, 6, 5]
    assert sample(metrics, "socket", "fqdnproxy_dnstap_frames_written_total") == 3


def test_socket_absent_then_present_then_gone_then_back(socket_path: str) -> None:
    metrics = Metrics()
    sink = FastRetrySink(framestreams.SocketWriter(socket_path, dnstap.CONTENT_TYPE), 100,
                         metrics)
    dropped = lambda reason: sample(metrics, "socket",  # noqa: E731
                                    "fqdnproxy_dnstap_frames_dropped_total", reason=reason)
    try:
        sink.emit(record())  # nobody listens: two frames dropped, counted
        assert wait_for(lambda: dropped("disconnected") == 2)
        assert not sink.connected

        first = FrameStreamsReader(socket_path)  # the collector starts: the sink connects
        assert first.started.wait(5.0)
        sink.emit(record(reply=False))
        assert first.got_payload.wait(5.0)
        first.close()  # the collector goes away mid-stream

        sink.emit(record(reply=False))  # this write fails: lost and counted
        assert wait_for(lambda: not sink.connected)
        assert dropped("write_error") == 1
        second = FrameStreamsReader(socket_path)  # the collector is back: the sink reconnects
        try:
            assert second.started.wait(5.0)
            sink.emit(record(reason="after the restart"))
            sink.close()
            assert second.stopped.wait(5.0)
        finally:
            second.close()
    finally:
        sink.close()
    assert len(first.payloads) == 1 and len(second.payloads) == 2
    messages = [decode(one(decode(p), 14)) for p in second.payloads]  # type: ignore[arg-type]
    policies = [decode(one(message, 15)) for message in messages]  # type: ignore[arg-type]
    assert [one(policy, 2) for policy in policies] == [b"after the restart"] * 2
    assert sample(metrics, "socket", "fqdnproxy_dnstap_frames_written_total") == 3


# --- the queue -----------------------------------------------------------------------------------


class BlockedWriter:
    """A writer whose first write blocks until released: the queue behind it fills."""

    name = "file"
    retries = False

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.release = threading.Event()
        self.payloads: list[bytes] = []
        self.closed = False

    def open(self) -> None:
        return None

    def write(self, payloads: list[bytes]) -> None:
        self.writing.set()
        assert self.release.wait(5.0)
        self.payloads.extend(payloads)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def test_full_queue_drops_and_counts_frames() -> None:
    writer = BlockedWriter()
    metrics = Metrics()
    sink = dnstap.DnstapSink(writer, 2, metrics)  # type: ignore[arg-type]
    try:
        sink.emit(record())  # taken by the writer thread, which then blocks in write
        assert writer.writing.wait(5.0)
        sink.emit(record())
        sink.emit(record(reply=False))  # the queue (2) is full now
        started = time.monotonic()
        sink.emit(record())  # 2 frames dropped
        sink.emit(record(reply=False))  # 1 frame dropped
        assert time.monotonic() - started < 0.1  # emit never waits for the writer
        assert sample(metrics, "file", "fqdnproxy_dnstap_frames_dropped_total",
                      reason="queue_full") == 3
    finally:
        writer.release.set()
        sink.close()
    assert len(writer.payloads) == 5 and writer.closed
    assert sample(metrics, "file", "fqdnproxy_dnstap_frames_written_total") == 5
