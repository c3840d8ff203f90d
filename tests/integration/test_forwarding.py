"""The proxy core on loopback against the controllable dnslib upstream (testing tier 2)."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import AsyncIterator

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from fqdnproxy import proxy as proxy_mod
from fqdnproxy.dns import server as server_mod
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.dns import wire
from fqdnproxy.observe.metrics import Metrics
from tests.support.audit_schema import RecordingAudit
from tests.support.dns_client import read_tcp_message, tcp_query, udp_exchange, udp_query
from tests.support.fake_upstream import Behaviour, FakeUpstream, closed_udp_port


@dataclass
class Rig:
    upstream: FakeUpstream
    proxy: proxy_mod.Proxy
    server: server_mod.DnsServer
    client: upstream_mod.UpstreamClient
    metrics: Metrics
    audit: RecordingAudit
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def v4(self) -> tuple[str, int]:
        return self.addresses["127.0.0.1"]

    @property
    def v6(self) -> tuple[str, int]:
        return self.addresses["::1"]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


async def make_rig(upstream_host: str = "127.0.0.1", *, timeout: float = 0.5,
                   max_in_flight: int = 1000, socket_max_queries: int = 2000,
                   limits: server_mod.ListenerLimits | None = None,
                   upstream_port: int | None = None) -> Rig:
    upstream = await FakeUpstream(upstream_host).start()
    metrics = Metrics()
    audit = RecordingAudit()
    settings = upstream_mod.UpstreamSettings(timeout=timeout, sockets_per_server=4,
                                             socket_max_queries=socket_max_queries)
    client = upstream_mod.UpstreamClient(settings, metrics)
    await client.start()
    target = (upstream_host, upstream_port) if upstream_port else upstream.address
    proxy = proxy_mod.Proxy(client, proxy_mod.RoundRobinUpstreams([target]), audit, metrics,
                            proxy_mod.ProxySettings(max_in_flight=max_in_flight))
    server = server_mod.DnsServer([("127.0.0.1", 0), ("::1", 0)], proxy.handle, metrics,
                                  limits or server_mod.ListenerLimits(),
                                  receive=proxy.receive)  # UDP as the agent wires it
    await server.start()
    rig = Rig(upstream, proxy, server, client, metrics, audit)
    for protocol, ip, port in server.bound:
        rig.addresses[ip] = (ip, port)
    return rig


async def close_rig(rig: Rig) -> None:
    await rig.server.stop()
    await rig.client.close()
    await rig.upstream.stop()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = await make_rig()
    yield rig
    await close_rig(rig)


def question(name: str, qtype: str = "A", qid: int = 4242) -> DNSRecord:
    request = DNSRecord.question(name, qtype)
    request.header.id = qid
    return request


# --- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v4", "v6"])
async def test_udp_answer_is_forwarded_with_the_client_id_restored(rig: Rig, family: str) -> None:
    rig.upstream.add("api.test. 300 IN A 192.0.2.10")
    answer = await udp_query(getattr(rig, family), question("api.test", qid=777))
    assert answer is not None
    assert answer.header.id == 777
    assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.10"]
    sent = rig.upstream.received[-1]
    assert sent.message.header.id != 777 or len(rig.upstream.received) > 1


async def test_upstream_sees_fresh_random_ids_and_several_source_ports(rig: Rig) -> None:
    for _ in range(40):
        assert await udp_query(rig.v4, question("api.test", qid=1)) is not None
    ids = {r.message.header.id for r in rig.upstream.received}
    ports = {r.client[1] for r in rig.upstream.received}
    assert len(ids) >= 35  # 40 draws from 65536: collisions are rare, a fixed ID is impossible
    assert len(ports) >= 2  # spread over the pool of sockets, each on its own random port


async def test_repeats_are_parsed_once_kept_and_answered_with_their_own_ids(rig: Rig) -> None:
    rig.upstream.add("api.test. 300 IN A 192.0.2.10")
    for qid in (101, 202, 303, 404):
        answer = await udp_query(rig.v4, question("api.test", qid=qid))
        assert answer is not None and answer.header.id == qid
        assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.10"]
    assert [r.query_id for r in rig.audit.records[-4:]] == [101, 202, 303, 404]
    lookups = "fqdnproxy_parse_cache_lookups_total"
    # The first sighting is remembered as bytes, the repeat is parsed and kept, the rest hit.
    # The fake upstream answers with the same bytes but our random ID: the same for answers.
    for kind in ("query", "response"):
        assert rig.metric(lookups, kind=kind, result="miss") == 2
        assert rig.metric(lookups, kind=kind, result="hit") == 2
        assert rig.metric(lookups, kind=f"{kind}_seen", result="hit") == 1
        assert rig.metric("fqdnproxy_parse_cache_entries", kind=kind) == 1


async def test_ipv6_upstream(rig: Rig) -> None:
    rig6 = await make_rig("::1")
    try:
        answer = await udp_query(rig6.v6, question("six.test", "AAAA"))
        assert answer is not None and str(answer.rr[0].rdata) == "2001:db8::53"
        assert ":" in rig6.upstream.received[-1].client[0]
    finally:
        await close_rig(rig6)


async def test_edns0_passes_through_both_ways(rig: Rig) -> None:
    request = question("edns.test")
    request.add_ar(EDNS0(udp_len=1232, flags="do"))
    answer = await udp_query(rig.v4, request)
    assert answer is not None
    opt = [rr for rr in rig.upstream.received[-1].message.ar if rr.rtype == QTYPE.OPT]
    assert opt and opt[0].rclass == 1232  # the OPT's class is the client's UDP payload size
    assert any(rr.rtype == QTYPE.OPT for rr in answer.ar)


async def test_question_name_is_compared_case_insensitively(rig: Rig) -> None:
    rig.upstream.behave("mixed.test.", Behaviour(lowercase_question=True))
    answer = await udp_query(rig.v4, question("MiXeD.TeSt"))
    assert answer is not None and answer.rr


async def test_truncated_answer_passes_and_the_tcp_retry_goes_over_tcp(rig: Rig) -> None:
    rig.upstream.add(*(f"big.test. 60 IN A 192.0.2.{i}" for i in range(1, 101)))
    rig.upstream.behave("big.test.", Behaviour(truncate=True))
    over_udp = await udp_query(rig.v4, question("big.test"))
    assert over_udp is not None and over_udp.header.tc == 1 and not over_udp.rr
    over_tcp = await tcp_query(rig.v4, question("big.test"))
    assert over_tcp is not None and len(over_tcp.rr) == 100
    assert rig.upstream.received[-1].protocol == "tcp"


async def test_hundred_record_answer_over_udp_and_audit_lists_them(rig: Rig) -> None:
    rig.upstream.add(*(f"many.test. 60 IN A 198.51.100.{i}" for i in range(1, 101)))
    request = question("many.test")
    request.add_ar(EDNS0(udp_len=4096))
    answer = await udp_query(rig.v4, request)
    assert answer is not None and len(answer.rr) == 100
    record = rig.audit.records[-1]
    assert record.type == "answer" and record.rcode == "NOERROR" and len(record.answers) == 100


# --- TCP --------------------------------------------------------------------------------------


async def test_tcp_several_queries_on_one_connection_answered_out_of_order(rig: Rig) -> None:
    rig.upstream.behave("slow.test.", Behaviour(delay=0.3))
    reader, writer = await asyncio.open_connection(*rig.v4)
    try:
        for name, qid in (("slow.test", 1), ("fast.test", 2)):
            data = question(name, qid=qid).pack()
            writer.write(struct.pack("!H", len(data)) + data)
        first = DNSRecord.parse(await read_tcp_message(reader))
        second = DNSRecord.parse(await read_tcp_message(reader))
        assert (first.header.id, second.header.id) == (2, 1)
    finally:
        writer.close()


async def test_tcp_stalled_partial_message_is_closed() -> None:
    limits = server_mod.ListenerLimits(tcp_message_timeout=0.2, tcp_idle_timeout=5.0)
    rig = await make_rig(limits=limits)
    try:
        reader, writer = await asyncio.open_connection(*rig.v4)
        writer.write(b"\x00\x30\x12")  # promises 48 bytes, sends 1
        assert await asyncio.wait_for(reader.read(), 3.0) == b""  # closed by the proxy
        assert rig.metric("fqdnproxy_tcp_connections_closed_total", reason="stalled") == 1
        writer.close()
    finally:
        await close_rig(rig)


async def test_tcp_idle_connection_is_closed() -> None:
    rig = await make_rig(limits=server_mod.ListenerLimits(tcp_idle_timeout=0.2))
    try:
        reader, writer = await asyncio.open_connection(*rig.v4)
        assert await asyncio.wait_for(reader.read(), 3.0) == b""
        assert rig.metric("fqdnproxy_tcp_connections_closed_total", reason="idle") == 1
        writer.close()
    finally:
        await close_rig(rig)


async def test_tcp_connection_cap() -> None:
    rig = await make_rig(limits=server_mod.ListenerLimits(tcp_max_connections=2))
    try:
        held = [await asyncio.open_connection(*rig.v4) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection(*rig.v4)
        assert await asyncio.wait_for(reader.read(), 3.0) == b""
        assert rig.metric("fqdnproxy_tcp_connections_closed_total", reason="limit") == 1
        # The held connections still work.
        data = question("ok.test", qid=9).pack()
        held[0][1].write(struct.pack("!H", len(data)) + data)
        assert DNSRecord.parse(await read_tcp_message(held[0][0])).header.id == 9
        for _, w in held + [(reader, writer)]:
            w.close()
    finally:
        await close_rig(rig)


# --- what the upstream must not be able to do -------------------------------------------------


@pytest.mark.parametrize("behaviour, reason", [
    (Behaviour(wrong_id=True), "unknown_id"),
    (Behaviour(wrong_question=True), "wrong_question"),
    (Behaviour(not_response=True), "not_response"),
])
async def test_unacceptable_answers_are_dropped_and_counted(
        rig: Rig, behaviour: Behaviour, reason: str) -> None:
    rig.upstream.behave("bad.test.", behaviour)
    answer = await udp_query(rig.v4, question("bad.test"), timeout=1.0)
    assert answer is None  # dropped; the query then timed out upstream: the client retries
    assert rig.metric("fqdnproxy_upstream_stray_answers_total", reason=reason) == 1
    assert rig.metric("fqdnproxy_upstream_errors_total", reason="timeout") == 1


async def test_answer_from_another_source_port_never_reaches_the_client(rig: Rig) -> None:
    # The upstream sockets are connected: the kernel itself drops datagrams from any other
    # address or port, so the forged answer never reaches userspace and the query times out.
    rig.upstream.behave("forged.test.", Behaviour(wrong_source=True))
    assert await udp_query(rig.v4, question("forged.test"), timeout=1.0) is None
    assert rig.metric("fqdnproxy_upstream_errors_total", reason="timeout") == 1


async def test_forged_answer_first_does_not_cancel_the_real_one(rig: Rig) -> None:
    rig.upstream.behave("race.test.", Behaviour(spoof_first=True))
    answer = await udp_query(rig.v4, question("race.test"))
    assert answer is not None and str(answer.q.qname) == "race.test."
    assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.53"]
    assert rig.metric("fqdnproxy_upstream_stray_answers_total", reason="wrong_question") == 1


async def test_tcp_answer_to_another_question_is_servfail(rig: Rig) -> None:
    rig.upstream.behave("tcpbad.test.", Behaviour(wrong_question=True))
    answer = await tcp_query(rig.v4, question("tcpbad.test"))
    assert answer is not None and answer.header.rcode == 2


# --- upstream failures ------------------------------------------------------------------------


async def test_silent_upstream_means_silence_and_an_audit_record(rig: Rig) -> None:
    rig.upstream.behave("void.test.", Behaviour(silent=True))
    assert await udp_query(rig.v4, question("void.test"), timeout=1.0) is None
    await asyncio.sleep(0.1)
    record = rig.audit.records[-1]
    assert record.type == "query" and record.rcode is None and "timeout" in record.reason


async def test_unreachable_upstream_gives_servfail_fast() -> None:
    rig = await make_rig(upstream_port=closed_udp_port(), timeout=5.0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await udp_query(rig.v4, question("x.test"), timeout=4.0)
        assert answer is not None and answer.header.rcode == 2  # SERVFAIL
        assert loop.time() - started < 4.0  # from the ICMP error, not the 5 s timeout
        assert rig.metric("fqdnproxy_upstream_errors_total", reason="unreachable") == 1
    finally:
        await close_rig(rig)


async def test_tcp_reset_by_upstream_gives_servfail(rig: Rig) -> None:
    rig.upstream.behave("reset.test.", Behaviour(reset_tcp=True))
    answer = await tcp_query(rig.v4, question("reset.test"))
    assert answer is not None and answer.header.rcode == 2


# --- bad clients ------------------------------------------------------------------------------


async def test_garbage_is_dropped_and_counted_and_the_listener_keeps_working(rig: Rig) -> None:
    assert await udp_exchange(rig.v4, b"\x01\x02\x03", timeout=0.3) is None
    assert rig.metric("fqdnproxy_malformed_queries_total", outcome="dropped") == 1
    assert await udp_query(rig.v4, question("after.test")) is not None


async def test_readable_header_with_broken_question_gets_formerr(rig: Rig) -> None:
    data = struct.pack("!6H", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x05ab"  # label runs off the end
    answer = await udp_exchange(rig.v4, data)
    assert answer is not None
    parsed = DNSRecord.parse(answer)
    assert parsed.header.id == 0xBEEF and parsed.header.rcode == 1  # FORMERR
    assert rig.metric("fqdnproxy_malformed_queries_total", outcome="formerr") == 1


async def test_a_response_sent_to_the_proxy_is_never_answered(rig: Rig) -> None:
    response = question("loop.test").reply().pack()
    assert await udp_exchange(rig.v4, response, timeout=0.3) is None


async def test_garbage_over_tcp_does_not_stop_the_listener(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection(*rig.v4)
    writer.write(b"\x00\x02\xff\xff")  # a 2-byte "message"
    data = question("tcp.test", qid=5).pack()
    writer.write(struct.pack("!H", len(data)) + data)
    assert DNSRecord.parse(await read_tcp_message(reader)).header.id == 5
    writer.close()


async def test_in_flight_cap_answers_servfail_past_it() -> None:
    rig = await make_rig(max_in_flight=2, timeout=1.0)
    try:
        rig.upstream.behave("slow.test.", Behaviour(delay=0.4))
        answers = await asyncio.gather(*(
            udp_query(rig.v4, question("slow.test", qid=i)) for i in range(6)))
        rcodes = sorted(a.header.rcode for a in answers if a is not None)
        assert rcodes.count(2) == 4 and rcodes.count(0) == 2
        assert rig.metric("fqdnproxy_overload_rejections_total") == 4
    finally:
        await close_rig(rig)


async def test_sockets_rotate_onto_new_ports() -> None:
    rig = await make_rig(socket_max_queries=3)
    try:
        for _ in range(30):
            assert await udp_query(rig.v4, question("rot.test")) is not None
        assert rig.metric("fqdnproxy_upstream_socket_rotations_total") >= 5
        ports = {r.client[1] for r in rig.upstream.received}
        assert len(ports) >= 6
        assert rig.metric("fqdnproxy_upstream_sockets") == 4  # retired sockets were closed
    finally:
        await close_rig(rig)


async def test_socket_closed_by_peer_is_harmless(rig: Rig) -> None:
    """A client that vanishes before its answer (ICMP unreachable on the reply) changes nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(question("gone.test").pack(), rig.v4)
    sock.close()
    await asyncio.sleep(0.1)
    assert await udp_query(rig.v4, question("still.test")) is not None


async def test_other_opcodes_get_notimp(rig: Rig) -> None:
    request = question("notify.test", qid=31)
    request.header.opcode = 4  # NOTIFY
    answer = await udp_query(rig.v4, request)
    assert answer is not None and answer.header.rcode == 4 and answer.header.id == 31
    assert not rig.upstream.received


async def test_tcp_per_connection_cap_is_back_pressure_not_loss() -> None:
    rig = await make_rig(limits=server_mod.ListenerLimits(tcp_max_queries_per_connection=2))
    try:
        rig.upstream.behave("slow.test.", Behaviour(delay=0.3))
        reader, writer = await asyncio.open_connection(*rig.v4)
        payload = b"".join(
            struct.pack("!H", len(d)) + d
            for d in (question("slow.test", qid=i).pack() for i in range(6)))
        writer.write(payload)  # six queries in one segment
        await asyncio.sleep(0.15)
        assert rig.proxy.in_flight == 2  # the rest wait in the buffer, unread
        ids = sorted([DNSRecord.parse(await read_tcp_message(reader, 5.0)).header.id
                      for _ in range(6)])
        assert ids == list(range(6))
        writer.close()
    finally:
        await close_rig(rig)


async def test_tcp_client_that_stops_reading_is_paused_then_closed() -> None:
    rig = await make_rig(limits=server_mod.ListenerLimits(tcp_idle_timeout=0.5))
    try:
        rig.upstream.add(*(f"big.test. 60 IN A 192.0.2.{i}" for i in range(1, 101)))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, rig.v4)
        query = question("big.test").pack()
        framed = struct.pack("!H", len(query)) + query
        try:
            for _ in range(3000):  # 3,000 queries of 1.6 KB answers, never reading one
                await asyncio.wait_for(loop.sock_sendall(sock, framed), 0.2)
        except (asyncio.TimeoutError, OSError):
            pass  # the proxy stopped reading: the client's send buffer filled up
        deadline = loop.time() + 15  # generous: a busy machine is slow to fill the buffers
        while rig.metric("fqdnproxy_tcp_connections_closed_total", reason="not_reading") < 1:
            assert loop.time() < deadline, "the non-reading client was never closed"
            await asyncio.sleep(0.05)
        assert rig.metric("fqdnproxy_tcp_connections") == 0
        sock.close()
    finally:
        await close_rig(rig)


async def test_server_pools_stay_bounded_and_leak_no_sockets() -> None:
    metrics = Metrics()
    settings = upstream_mod.UpstreamSettings(timeout=0.3, sockets_per_server=2, max_servers=4)
    client = upstream_mod.UpstreamClient(settings, metrics)
    await client.start()
    upstreams = [await FakeUpstream().start() for _ in range(12)]
    try:
        data = question("pool.test").pack()
        query = wire.parse_query(bytes(data))
        for upstream in upstreams:  # one after another: each older pool is idle when evicted
            assert await client.exchange_udp(upstream.address, query, bytes(data))
        assert len(client._pools) <= 4
        assert metrics.registry.get_sample_value("fqdnproxy_upstream_sockets") <= 8
        # Many at once: pools being filled are never evicted half-made.
        await asyncio.gather(*(client.exchange_udp(u.address, query, bytes(data))
                               for u in upstreams), return_exceptions=True)
    finally:
        await client.close()
        for upstream in upstreams:
            await upstream.stop()
    assert metrics.registry.get_sample_value("fqdnproxy_upstream_sockets") == 0


async def test_a_noisy_client_is_rate_limited_and_a_quiet_one_is_not() -> None:
    from fqdnproxy import ratelimit

    rig = await make_rig()
    rig.proxy._buckets = ratelimit.TokenBuckets(ratelimit.RateLimit(rate=5, burst=10))
    try:
        noisy = await asyncio.gather(*(udp_query(rig.v4, question("noisy.test", qid=i),
                                                 source="127.0.0.5") for i in range(40)))
        refused = [a for a in noisy if a is not None and a.header.rcode == 5]
        assert 25 <= len(refused) <= 30  # a burst of 10 (plus what refills meanwhile) passed
        quiet = await udp_query(rig.v4, question("quiet.test"), source="127.0.0.6")
        assert quiet is not None and quiet.header.rcode == 0
        limited = [r for r in rig.audit.records if r.verdict == "rate-limited"]
        assert len(limited) <= 2  # audited once per client and second, the rest counted
        assert rig.metric("fqdnproxy_queries_total", verdict="rate-limited", qtype="A",
                          protocol="udp") == len(refused)
    finally:
        await close_rig(rig)
