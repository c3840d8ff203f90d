"""dns/reuseport.py: listeners shared by DNS workers, and one client's datagrams spread over them.

On loopback, unprivileged: the program is classic BPF on the socket group, which any process may
attach to its own sockets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from dnslib import DNSRecord

from fqdnproxy.dns import reuseport
from fqdnproxy.dns import server as server_mod
from fqdnproxy.observe.metrics import Metrics


def _group(size: int) -> list[socket.socket]:
    """``size`` UDP sockets sharing one loopback port."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reuseport.share(first)
    first.bind(("127.0.0.1", 0))
    group = [first]
    for _ in range(size - 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        reuseport.share(sock)
        sock.bind(first.getsockname())
        group.append(sock)
    for sock in group:
        sock.setblocking(False)
    return group


@pytest.fixture
def pair() -> Iterator[list[socket.socket]]:
    group = _group(2)
    yield group
    for sock in group:
        sock.close()


def _counts(group: list[socket.socket], datagrams: int) -> list[int]:
    """Send ``datagrams`` from one client socket (one 4-tuple); how many each socket got."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for _ in range(datagrams):
            client.sendto(b"q", group[0].getsockname())
    counts = []
    for sock in group:
        received = 0
        while True:
            try:
                sock.recv(16)
            except BlockingIOError:
                break
            received += 1
        counts.append(received)
    return counts


def test_one_client_socket_is_hashed_to_one_worker_without_the_program(
        pair: list[socket.socket]) -> None:
    """Why the program exists: the kernel's default is a hash of the 4-tuple."""
    assert sorted(_counts(pair, 200)) == [0, 200]


def test_the_program_spreads_one_client_socket_over_the_workers(
        pair: list[socket.socket]) -> None:
    reuseport.spread(pair[0], 2)  # the group's program: set once, from any member
    counts = _counts(pair, 200)
    assert sum(counts) == 200 and min(counts) > 0  # all 200 on one: once in 2**199 runs


async def test_dns_servers_of_two_workers_share_the_port_and_the_queries() -> None:
    """Two DnsServers with workers=2 (two workers' listeners, here in one process) bind the
    same address, UDP and TCP, and one client socket's queries reach both."""
    served: list[str] = []

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def handle(data: bytes, client: object) -> bytes:
            served.append(name)
            return bytes(DNSRecord.parse(data).reply().pack())
        return handle

    port = server_mod.DnsServer([("127.0.0.1", 0)], handler("probe"), Metrics(),
                                server_mod.ListenerLimits(), workers=2)
    await port.start()
    address = ("127.0.0.1", port.bound[0][2])
    await port.stop()
    servers = [server_mod.DnsServer([address], handler(name), Metrics(),
                                    server_mod.ListenerLimits(), workers=2) for name in "ab"]
    for server in servers:
        await server.start()
    try:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            await loop.sock_connect(client, address)
            for _ in range(60):
                await loop.sock_sendall(client, DNSRecord.question("a.test", "A").pack())
                await asyncio.wait_for(loop.sock_recv(client, 512), 2.0)
        assert sorted(set(served)) == ["a", "b"]  # all 60 on one: once in 2**59 runs
        assert {kind for server in servers for kind, _, _ in server.bound} == {"udp", "tcp"}
    finally:
        for server in servers:
            await server.stop()
