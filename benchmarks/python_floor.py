"""The floor under any Python DNS proxy: a bare uvloop UDP forwarder, for the DNS comparison.

    .venv/bin/python benchmarks/python_floor.py LISTEN_IP:PORT UPSTREAM_IP:PORT

What it does per query is the least a forwarding proxy can do: receive a datagram, give it a
fresh ID, send it upstream on a connected socket, receive the answer, match the ID, restore the
client's ID and send it back. No parsing, no policy, no spoofing checks beyond the ID, no
learning, no audit, no metrics, no timeouts (a lost query leaks its table slot; the run is short).
It is *not* a usable proxy: it is the measuring stick that tells how much of fqdnproxy's cost per
query is CPython and the event loop, and how much is fqdnproxy's own work (dns_compare.py runs it
as the target "python floor" under the same dnsperf load).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import Any

import uvloop


class Upstream(asyncio.DatagramProtocol):
    """One connected socket to the upstream; answers go back to whoever asked."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[int, tuple[Any, bytes, asyncio.DatagramTransport]] = {}
        self._ids = itertools.cycle(range(65536))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def forward(self, data: bytes, addr: Any, reply_to: asyncio.DatagramTransport) -> None:
        query_id = next(self._ids)
        self.waiting[query_id] = (addr, data[:2], reply_to)
        assert self.transport is not None
        self.transport.sendto(query_id.to_bytes(2, "big") + data[2:])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        entry = self.waiting.pop(int.from_bytes(data[:2], "big"), None)
        if entry is not None:
            client, client_id, reply_to = entry
            reply_to.sendto(client_id + data[2:], client)


class Listener(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.upstream.forward(data, addr, self.transport)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], upstream_addr: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    _, upstream = await loop.create_datagram_endpoint(Upstream, remote_addr=upstream_addr)
    await loop.create_datagram_endpoint(lambda: Listener(upstream), local_addr=listen)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(_address(sys.argv[1]), _address(sys.argv[2])))
