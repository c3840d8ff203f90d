"""handover.py: a new server takes the old one's listening sockets; nothing queued is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dnslib import DNSRecord

from fqdnproxy import handover
from fqdnproxy.dns import server as server_mod
from fqdnproxy.observe.metrics import Metrics
from tests.support.dns_client import tcp_query, udp_exchange


def _handler(name: str):  # type: ignore[no-untyped-def]
    async def handle(data: bytes, client: object) -> bytes:
        reply = DNSRecord.parse(data).reply()
        reply.add_answer(*__import__("dnslib").RR.fromZone(f"who.test. 60 IN TXT {name}"))
        return bytes(reply.pack())
    return handle


async def _who(address: tuple[str, int]) -> str:
    answer = await udp_exchange(address, DNSRecord.question("who.test", "TXT").pack(), 2.0)
    assert answer is not None
    return str(DNSRecord.parse(answer).rr[0].rdata).strip('"')


async def test_successor_takes_the_sockets_and_the_queued_queries(tmp_path: Path) -> None:
    path = tmp_path / "handover.sock"
    old = server_mod.DnsServer([("127.0.0.1", 0)], _handler("old"), Metrics(),
                               server_mod.ListenerLimits())
    await old.start()
    address = ("127.0.0.1", old.bound[0][2])
    assert await _who(address) == "old"

    async def prepare() -> list[server_mod.ListenerSocket]:
        return old.sockets

    done = asyncio.Event()

    async def handed() -> None:
        old.stop_listening()  # the old agent's copies close; the sockets live on in the new
        done.set()

    server = handover.HandoverServer(path, prepare, handed)
    server.start()
    inherited = await asyncio.to_thread(handover.take_over, path)
    assert inherited is not None and {s.kind for s in inherited} == {"udp", "tcp"}
    await asyncio.wait_for(done.wait(), 5)
    # Nobody reads the sockets now: these queries wait in the kernel's buffer.
    queued = [asyncio.ensure_future(udp_exchange(
        address, DNSRecord.question("who.test", "TXT").pack(), 5.0)) for _ in range(20)]
    await asyncio.sleep(0.3)
    new = server_mod.DnsServer([("127.0.0.1", 0)], _handler("new"), Metrics(),
                               server_mod.ListenerLimits())
    await new.start(inherited)
    try:
        assert new.bound[0][2] == address[1]  # the same port, the same socket
        answers = await asyncio.gather(*queued)
        assert all(a is not None for a in answers)  # every queued query was answered
        assert await _who(address) == "new"
        reply = await tcp_query(address, DNSRecord.question("who.test", "TXT"))
        assert reply is not None and str(reply.rr[0].rdata).strip('"') == "new"
        assert not path.exists()  # the old agent's handover socket is gone
    finally:
        await new.stop()
        await old.stop()


def test_no_running_agent_means_no_handover(tmp_path: Path) -> None:
    assert handover.take_over(tmp_path / "absent.sock") is None
    stale = tmp_path / "stale.sock"
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # the file of a killed agent: nobody listens
    assert handover.take_over(stale) is None
