"""Arbitrary bytes at the whole query path, over UDP and TCP, with a policy loaded (bounded for
CI; `make fuzz` runs the long atheris version in fuzz/).

Whatever a client sends, the proxy answers or stays silent, the handler never fails, and the
listeners keep serving: after every example a valid query from the endpoint still gets its
answer.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import pytest
import uvloop
from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration import test_learning as learning
from tests.support.dns_client import udp_exchange, udp_query

VALID = [bytes(DNSRecord.question(name, qtype).pack())
         for name, qtype in (("api.allowed.test", "A"), ("chain.test", "AAAA"),
                             ("other.test", "TXT"))]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop,
                                                                    learning.Rig]]:
    loop = uvloop.new_event_loop()
    rig = loop.run_until_complete(learning.make_rig(tmp_path_factory.mktemp("fuzz")))
    rig.upstream.add("api.allowed.test. 300 IN A 203.0.113.10")
    yield loop, rig
    loop.run_until_complete(learning.close(rig))
    loop.close()


def _mutations() -> st.SearchStrategy[bytes]:
    """Valid queries with bytes flipped, cut or appended, and plain noise."""
    def mutate(base: bytes, at: int, value: int, cut: int, tail: bytes) -> bytes:
        data = bytearray(base)
        data[at % len(data)] = value
        return bytes(data[: max(0, len(data) - cut)]) + tail

    mutated = st.builds(mutate, st.sampled_from(VALID), st.integers(0, 200),
                        st.integers(0, 255), st.integers(0, 20), st.binary(max_size=8))
    return st.one_of(st.binary(max_size=600), mutated)


async def _tcp_send(address: tuple[str, int], data: bytes, source: str) -> None:
    reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    try:
        writer.write(struct.pack("!H", len(data) & 0xFFFF) + data[:0xFFFF])
        try:
            await asyncio.wait_for(reader.read(65535), 0.2)
        except asyncio.TimeoutError:
            pass
    finally:
        writer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_mutations(), over_tcp=st.booleans())
def test_arbitrary_bytes_never_break_the_proxy(
        rig: tuple[asyncio.AbstractEventLoop, learning.Rig], data: bytes, over_tcp: bool) -> None:
    loop, r = rig

    async def exchange() -> None:
        if over_tcp:
            await _tcp_send(r.address, data, learning.WEB1)
        else:
            await udp_exchange(r.address, data, 0.2, learning.WEB1)
        answer = await udp_query(r.address, DNSRecord.question("api.allowed.test"), 2.0,
                                 learning.WEB1)
        assert answer is not None and answer.header.rcode == 0

    loop.run_until_complete(exchange())
    errors = r.server._metrics.registry.get_sample_value("fqdnproxy_handler_errors_total")
    assert not errors  # nothing reached the catch-all boundary
