"""dns/upstream.py over real loopback sockets: each query settles exactly once through its
callback, and a settled query is forgotten at once (nothing waits for its deadline)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dnslib import DNSRecord

from fqdnproxy.dns import upstream, wire
from fqdnproxy.observe.metrics import Metrics


class _Responder(asyncio.DatagramProtocol):
    """Answers every query (NOERROR, no records) unless told to stay silent."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.silent = False
        self.received: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        if not self.silent and self.transport is not None:
            self.transport.sendto(bytes(DNSRecord.parse(data).reply().pack()), addr)


async def _responder() -> tuple[_Responder, tuple[str, int]]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        _Responder, local_addr=("127.0.0.1", 0))
    return protocol, transport.get_extra_info("sockname")[:2]


def _query(name: str) -> tuple[wire.Query, bytes]:
    data = bytes(DNSRecord.question(name, "A").pack())
    return wire.parse_query(data), data


async def _settled(outcomes: list[Any], count: int) -> None:
    for _ in range(200):
        if len(outcomes) >= count:
            return
        await asyncio.sleep(0.01)


async def test_an_answered_query_settles_once_and_is_forgotten() -> None:
    responder, server = await _responder()
    client = upstream.UpstreamClient(upstream.UpstreamSettings(), Metrics())
    await client.start()
    try:
        outcomes: list[tuple[bytes | None, Exception | None]] = []
        for n in range(20):
            query, data = _query(f"n{n}.settle.test")
            client.send_udp(server, query, data, lambda a, e: outcomes.append((a, e)))
        await _settled(outcomes, 20)
        await asyncio.sleep(0.05)  # room for a second, wrong settlement
        assert len(outcomes) == 20
        assert all(error is None and answer is not None for answer, error in outcomes)
        names = sorted(DNSRecord.parse(a).q.qname.idna() for a, _ in outcomes if a is not None)
        assert names == sorted(f"n{n}.settle.test." for n in range(20))
        assert len(client._deadlines) == 0  # nothing kept until its deadline
    finally:
        await client.close()
        assert responder.transport is not None
        responder.transport.close()


async def test_a_silent_server_times_out_once_and_a_late_answer_is_stray() -> None:
    responder, server = await _responder()
    responder.silent = True
    metrics = Metrics()
    client = upstream.UpstreamClient(upstream.UpstreamSettings(timeout=0.2), metrics)
    await client.start()
    try:
        outcomes: list[tuple[bytes | None, Exception | None]] = []
        query, data = _query("silent.settle.test")
        client.send_udp(server, query, data, lambda a, e: outcomes.append((a, e)))
        await _settled(outcomes, 1)
        assert len(outcomes) == 1
        assert outcomes[0][0] is None and isinstance(outcomes[0][1], upstream.UpstreamTimeout)
        assert len(client._deadlines) == 0
        # The answer arrives after the timeout: it settles nothing and is counted as a stray.
        assert responder.transport is not None and responder.received
        sent = responder.received[0]
        pool = client._pools[server]
        for sock in pool.sockets:
            assert sock.transport is not None
            port = sock.transport.get_extra_info("sockname")[1]
            responder.transport.sendto(bytes(DNSRecord.parse(sent).reply().pack()),
                                       ("127.0.0.1", port))
        await asyncio.sleep(0.1)
        assert len(outcomes) == 1
        assert metrics.registry.get_sample_value(
            "fqdnproxy_upstream_stray_answers_total", {"reason": "unknown_id"}) >= 1
    finally:
        await client.close()
        responder.transport.close()


async def test_closing_the_client_fails_every_waiting_query_once() -> None:
    responder, server = await _responder()
    responder.silent = True
    client = upstream.UpstreamClient(upstream.UpstreamSettings(timeout=5.0), Metrics())
    await client.start()
    outcomes: list[tuple[bytes | None, Exception | None]] = []
    for n in range(5):
        query, data = _query(f"c{n}.settle.test")
        client.send_udp(server, query, data, lambda a, e: outcomes.append((a, e)))
    started = time.monotonic()
    while len(responder.received) < 5 and time.monotonic() - started < 2:
        await asyncio.sleep(0.01)
    await client.close()
    await asyncio.sleep(0.05)
    assert len(outcomes) == 5
    assert all(isinstance(e, upstream.UpstreamUnreachable) for _, e in outcomes)
    assert len(client._deadlines) == 0
    assert responder.transport is not None
    responder.transport.close()
