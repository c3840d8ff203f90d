"""Test clients: send one query over UDP (asyncio-dgram) or TCP and return the parsed answer."""

from __future__ import annotations

import asyncio
import struct

import asyncio_dgram
from dnslib import DNSRecord


async def udp_exchange(server: tuple[str, int], data: bytes, timeout: float = 2.0,
                       source: str | None = None) -> bytes | None:
    """Send ``data`` over UDP (from ``source`` if given); the answer's bytes, or None if none
    came within ``timeout``."""
    if source:  # an unconnected socket bound to the source address
        stream = await asyncio_dgram.bind((source, 0))
        send = stream.send(data, server)  # type: ignore[call-arg]
    else:
        stream = await asyncio_dgram.connect(server)
        send = stream.send(data)
    try:
        await send
        try:
            answer, _ = await asyncio.wait_for(stream.recv(), timeout)
        except asyncio.TimeoutError:
            return None
        return answer
    finally:
        stream.close()


async def udp_query(server: tuple[str, int], request: DNSRecord, timeout: float = 2.0,
                    source: str | None = None) -> DNSRecord | None:
    answer = await udp_exchange(server, request.pack(), timeout, source)
    return DNSRecord.parse(answer) if answer is not None else None


async def tcp_query(server: tuple[str, int], request: DNSRecord, timeout: float = 2.0,
                    source: str | None = None) -> DNSRecord | None:
    """One query on a new TCP connection (from ``source`` if given)."""
    reader, writer = await asyncio.open_connection(
        *server, local_addr=(source, 0) if source else None)
    try:
        data = request.pack()
        writer.write(struct.pack("!H", len(data)) + data)
        return DNSRecord.parse(await read_tcp_message(reader, timeout))
    except (asyncio.TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


async def read_tcp_message(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))
    return await asyncio.wait_for(reader.readexactly(length), timeout)
