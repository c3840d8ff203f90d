"""Coverage-guided fuzzing (atheris) of what a client's bytes reach: the wire parser, the
answer checks and the whole query path (the proxy with a policy loaded, over loopback).

    .venv/bin/python fuzz/fuzz_query_path.py -atheris_runs=1000000    # or: make fuzz

Every input goes to ``wire.parse_query`` / ``parse_response`` / ``parse_header`` (which may
raise only ``WireError``), to ``upstream.check_answer``, and then as a query into
``Proxy.handle`` of a proxy whose decide stage is a real ``PolicyDecider`` over the demo
policies and whose upstream is a real UDP server on loopback. ``handle`` must return bytes or
None and never raise; a crash, an exception or a hang (libFuzzer's -timeout) is a finding, and
its input becomes a regression test in tests/dns/test_wire.py or tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from fqdnproxy import proxy as proxy_mod
    from fqdnproxy.dns import upstream as upstream_mod
    from fqdnproxy.dns import wire
    from fqdnproxy.exchange import Client
    from fqdnproxy.observe.audit import NullAuditSink
    from fqdnproxy.observe.metrics import Metrics
    from fqdnproxy.policy.decider import PolicyDecider
    from fqdnproxy.policy.reload import PolicyStore

ROOT = Path(__file__).resolve().parent.parent


class _Answering(asyncio.DatagramProtocol):
    """A tiny real upstream: answers every query with its own bytes turned into a response."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 12:
            reply = data[:2] + bytes([data[2] | 0x80, data[3]]) + data[4:]
            self.transport.sendto(reply, addr)  # type: ignore[attr-defined]


def build() -> tuple[asyncio.AbstractEventLoop, proxy_mod.Proxy]:
    loop = asyncio.new_event_loop()
    transport, _ = loop.run_until_complete(
        loop.create_datagram_endpoint(_Answering, local_addr=("127.0.0.1", 0)))
    upstream_address = transport.get_extra_info("sockname")
    store = PolicyStore(ROOT / "policies" / "demo.yaml", ROOT / "policies" / "endpoints.demo.yaml")
    store.load()
    metrics = Metrics()
    client = upstream_mod.UpstreamClient(upstream_mod.UpstreamSettings(timeout=0.05), metrics)
    loop.run_until_complete(client.start())
    proxy = proxy_mod.Proxy(client, proxy_mod.RoundRobinUpstreams([upstream_address]),
                            NullAuditSink(), metrics,
                            decider=PolicyDecider(lambda: store.current))
    return loop, proxy


LOOP, PROXY = build()
# The frontend pod of the demo inventory, asking kube-dns: its queries reach every stage.
CLIENTS = (Client("198.51.100.10", 40000, "udp", ("198.51.100.53", 53)),
           Client("198.51.100.10", 40001, "tcp", ("198.51.100.53", 53)),
           Client("192.0.2.99", 40002, "udp", ("198.51.100.53", 53)))


def test_one_input(data: bytes) -> None:
    for parse in (wire.parse_header, wire.parse_query, wire.parse_response):
        try:
            parse(data)
        except wire.WireError:
            pass
    upstream_mod.check_answer(data, 0x1234, b"\x03api\x04demo\x04test\x00\x00\x01\x00\x01")
    client = CLIENTS[data[0] % len(CLIENTS)] if data else CLIENTS[0]
    reply = LOOP.run_until_complete(PROXY.handle(data, client))
    if reply is not None and not isinstance(reply, bytes):
        raise AssertionError(f"handle returned {type(reply)}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
