"""Transparent sockets: receive pods' DNS redirected by TPROXY, answer as the server they asked.

UDP: the listener socket (IP_TRANSPARENT, IP_RECVORIGDSTADDR) is read with ``recvmsg`` so each
datagram comes with its original destination (asyncio's datagram transports drop ancillary
data, so this module reads the socket itself through ``loop.add_reader``). The reply is sent
from a short-lived socket bound to that original address (IP_TRANSPARENT allows binding a
foreign address) and connected to the client, then closed at once. It is connected because
TPROXY looks sockets up by the packet's original destination first: an unconnected socket
bound to 10.96.0.10:53 would catch other pods' queries meant for the listener.

TCP: the listening socket has IP_TRANSPARENT; an accepted connection's local address is the
original destination, and answers go back on the same connection (see ``server.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
from typing import Any

from fqdnproxy.exchange import Client

log = logging.getLogger(__name__)

# From linux/in.h and linux/in6.h; the socket module does not name them all.
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # also the cmsg type IP_ORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74  # also the cmsg type IPV6_ORIGDSTADDR
IPV6_TRANSPARENT = 75
SOL_IP = socket.IPPROTO_IP
SOL_IPV6 = socket.IPPROTO_IPV6

MAX_DATAGRAM = 65_535
ANCILLARY = socket.CMSG_SPACE(64)
READS_PER_WAKEUP = 64  # datagrams read per readiness callback before yielding to the loop


def make_transparent(sock: socket.socket, family: int) -> None:
    """Let ``sock`` bind foreign addresses and receive TPROXY'd packets."""
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def report_original_destination(sock: socket.socket) -> None:
    """Make a transparent UDP listener deliver each datagram's original destination."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The (ip, port) a redirected datagram was sent to, from its ancillary data."""
    for level, kind, data in ancillary:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def send_from(source: tuple[str, int], destination: tuple[Any, ...], data: bytes) -> bool:
    """Send ``data`` to ``destination`` with ``source`` as its source address; False if it
    could not be sent (counted by the caller; the client retries)."""
    family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            make_transparent(sock, family)
            sock.setblocking(False)
            sock.bind(source)
            sock.connect(destination[:2])
            sock.send(data)
    except OSError as error:
        log.debug("reply from %s to %s failed: %s", source, destination, error)
        return False
    return True


class TransparentUdpListener:
    """Reads redirected datagrams and hands each to the query receiver (dns/server.py)."""

    def __init__(self, sock: socket.socket, receive: Any, tasks: Any, metrics: Any) -> None:
        self._sock = sock
        self._receive = receive
        self._tasks = tasks
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data, ancillary, _, peer = self._sock.recvmsg(MAX_DATAGRAM, ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # an ICMP error for an earlier reply; keep reading
                log.debug("transparent udp: %s", error)
                continue
            original = original_destination(ancillary)
            if original is None:
                self._metrics.malformed.labels("no_original_destination").inc()
                continue
            client = Client(peer[0], peer[1], "udp", original)
            self._tasks.receiving += 1
            try:
                self._receive(data, client, functools.partial(self._reply, client, peer))
            except Exception:  # the receiver guards itself; this is the last line
                log.exception("transparent udp receiver failed")
                self._tasks.receiving -= 1

    def _reply(self, client: Client, peer: tuple[Any, ...], reply: bytes | None) -> None:
        self._tasks.receiving -= 1
        if reply is not None and not send_from(client.local, peer, reply):
            self._metrics.reply_failures.inc()
