"""A controllable upstream DNS server for loopback tests (dnslib, real UDP and TCP sockets).

What it does for a query is chosen per query name, so one server covers a whole table of cases:

    upstream.behave("slow.test.", Behaviour(delay=0.3))
    upstream.behave("spoofed.test.", Behaviour(wrong_id=True))

Names without a behaviour get the records in ``zone`` or, failing that, one A record derived from
the name. Every query received is kept in ``received`` (message, client address, protocol) so
tests can check what the proxy really sent.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any

from dnslib import AAAA, EDNS0, QTYPE, RR, A, DNSRecord


@dataclass
class Behaviour:
    """How the server treats one query name."""

    delay: float = 0.0  # seconds before answering
    silent: bool = False  # never answer
    wrong_id: bool = False  # answer with ID + 1 only
    wrong_source: bool = False  # answer from another socket (another source port)
    wrong_question: bool = False  # answer a different name only
    not_response: bool = False  # send the answer with QR cleared
    truncate: bool = False  # over UDP: TC set, no answers; over TCP: the full answer
    spoof_first: bool = False  # first a wrong-question answer with the right ID, then the real
    reset_tcp: bool = False  # over TCP: close the connection without answering
    lowercase_question: bool = False  # echo the question name lowercased (0x20-unaware server)
    rcode: int = 0


@dataclass
class Received:
    message: DNSRecord
    raw: bytes
    client: tuple[Any, ...]
    protocol: str


class FakeUpstream:
    """UDP and TCP on one loopback port (IPv4 or IPv6)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.zone: dict[str, list[RR]] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.received: list[Received] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._other_udp: socket.socket | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def behave(self, name: str, behaviour: Behaviour) -> None:
        self.behaviours[name.lower()] = behaviour

    def add(self, *records: str) -> None:
        """Add zone records in presentation format, e.g. ``"a.test. 60 IN A 192.0.2.1"``."""
        for text in records:
            for rr in RR.fromZone(text):
                self.zone.setdefault(str(rr.rname).lower(), []).append(rr)

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for attempt in range(20):  # the UDP port the kernel picks may be busy for TCP
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            self.port = udp.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
                break
            except OSError:
                udp.close()
                if attempt == 19:
                    raise
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._other_udp = socket.socket(family, socket.SOCK_DGRAM)
        self._other_udp.bind((self.host, 0))
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._other_udp is not None:
            self._other_udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    # --- answering ----------------------------------------------------------------------------

    def answer_for(self, request: DNSRecord, protocol: str) -> DNSRecord:
        qname = str(request.q.qname).lower()
        behaviour = self.behaviours.get(qname, Behaviour())
        reply = request.reply()
        reply.header.rcode = behaviour.rcode
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(EDNS0(udp_len=1232))
        if behaviour.truncate and protocol == "udp":
            reply.header.tc = 1
            return reply
        for rr in self._records(qname, request.q.qtype):
            reply.add_answer(rr)
        return reply

    def _records(self, qname: str, qtype: int) -> list[RR]:
        if qname in self.zone:
            found: list[RR] = []
            name = qname
            for _ in range(16):  # follow CNAMEs inside the zone, as an authority would
                records = self.zone.get(name, [])
                found += [rr for rr in records if rr.rtype in (qtype, QTYPE.CNAME)]
                cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME]
                if not cnames or qtype == QTYPE.CNAME:
                    break
                name = str(cnames[0].rdata.label).lower()
            return found
        if qtype == QTYPE.AAAA:
            return [RR(qname, QTYPE.AAAA, rdata=AAAA("2001:db8::53"), ttl=60)]
        if qtype == QTYPE.A:
            return [RR(qname, QTYPE.A, rdata=A("192.0.2.53"), ttl=60)]
        return []

    async def respond(self, raw: bytes, client: tuple[Any, ...], protocol: str) -> bytes | None:
        """The bytes to send back to ``client`` over ``protocol``, after any behaviour."""
        try:
            request = DNSRecord.parse(raw)
        except Exception:
            return None
        self.received.append(Received(request, raw, client, protocol))
        behaviour = self.behaviours.get(str(request.q.qname).lower(), Behaviour())
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.silent:
            return None
        reply = self.answer_for(request, protocol)
        if behaviour.wrong_question:
            reply.q.qname = "elsewhere.test."
        if behaviour.lowercase_question:
            reply.q.qname = str(request.q.qname).lower()
        if behaviour.wrong_id:
            reply.header.id = (request.header.id + 1) & 0xFFFF
        if behaviour.not_response:
            reply.header.qr = 0
        return reply.pack()

    def send_udp(self, data: bytes, client: tuple[Any, ...], from_other: bool = False) -> None:
        if from_other and self._other_udp is not None:
            self._other_udp.sendto(data, client)
        elif self._udp is not None:
            self._udp.sendto(data, client)

    async def serve_udp(self, raw: bytes, client: tuple[Any, ...]) -> None:
        data = await self.respond(raw, client, "udp")
        if data is None:
            return
        request = DNSRecord.parse(raw)
        behaviour = self.behaviours.get(str(request.q.qname).lower(), Behaviour())
        if behaviour.spoof_first:
            spoof = request.reply()
            spoof.q.qname = "attacker.test."
            spoof.add_answer(RR("attacker.test.", QTYPE.A, rdata=A("203.0.113.66"), ttl=60))
            self.send_udp(spoof.pack(), client)
        self.send_udp(data, client, from_other=behaviour.wrong_source)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                raw = await reader.readexactly(length)
                request = DNSRecord.parse(raw)
                if self.behaviours.get(str(request.q.qname).lower(), Behaviour()).reset_tcp:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.close()
                    return
                data = await self.respond(raw, client, "tcp")
                if data is not None:
                    writer.write(struct.pack("!H", len(data)) + data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.spawn(self.server.serve_udp(data, addr))


def closed_udp_port(host: str = "127.0.0.1") -> int:
    """A loopback port with nothing listening (ICMP port unreachable comes back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
