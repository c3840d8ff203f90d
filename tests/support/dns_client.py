"""Test clients: send one query over UDP (asyncio-dgram) or TCP and return the parsed answer."""

from __future__ import annotations

import asyncio
import struct

import asyncio_dgram
from dnslib import DNSRecord


async def udp_exchange(server: tuple[str, int], data: bytes, timeout: float = 2.0) -> bytes | None:
    """Send ``data`` over UDP; the answer's bytes, or None if none came within ``timeout``."""
    stream = await asyncio_dgram.connect(server)
    try:
        await stream.send(data)
        try:
            answer, _ = await asyncio.wait_for(stream.recv(), timeout)
        except asyncio.TimeoutError:
            return None
        return answer
    finally:
        stream.close()


async def udp_query(server: tuple[str, int], request: DNSRecord,
                    timeout: float = 2.0) -> DNSRecord | None:
    answer = await udp_exchange(server, request.pack(), timeout)
    return DNSRecord.parse(answer) if answer is not None else None


async def tcp_query(server: tuple[str, int], request: DNSRecord,
                    timeout: float = 2.0) -> DNSRecord | None:
    """One query on a new TCP connection."""
    reader, writer = await asyncio.open_connection(*server)
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
