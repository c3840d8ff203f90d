"""UDP and TCP listeners: they frame bytes and hand each message to the query handler.

Nothing here knows DNS beyond TCP's 2-byte length prefix. A UDP datagram goes to the
receiver, ``receive(data, client, done)``, which calls ``done(reply)`` once, now or later; no task
per datagram. A TCP message becomes one task running ``handle(data, client)``. Either way the
reply (if any) goes back the way the query came. Handlers never raise (they answer SERVFAIL at
their own boundary), but the listener still guards: nothing a client sends may stop a listener.

TCP limits: a cap on open connections (past it new ones are closed at once), an idle timeout, a
timeout for a partial message that stalls, and a cap on queries one connection may have in flight
(past it the connection stops being read until answers go out). Answers may leave out of order.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import socket
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fqdnproxy.dns import reuseport
from fqdnproxy.dns import transparent as transparent_mod
from fqdnproxy.exchange import Client, ReplyCallback
from fqdnproxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

WRITE_BUFFER_HIGH = 64 * 1024  # bytes of unread answers per TCP connection before pausing


QueryHandler = Callable[[bytes, Client], Awaitable[bytes | None]]
QueryReceiver = Callable[[bytes, Client, ReplyCallback], None]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """TCP limits; see ``config.DnsConfig`` for the documented defaults."""

    tcp_max_connections: int = 1_000
    tcp_idle_timeout: float = 10.0
    tcp_message_timeout: float = 5.0
    tcp_max_queries_per_connection: int = 100


class TaskSet:
    """The queries in flight: handler tasks, so shutdown can cancel them and nothing is
    garbage-collected while it runs, and a count of datagrams handed to a receiver and not yet
    settled, so a drain can wait for them too."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.receiving = 0

    @property
    def busy(self) -> bool:
        return bool(self.tasks) or self.receiving > 0

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def receiver(self, handle: QueryHandler) -> QueryReceiver:
        """A receiver that runs the awaitable ``handle`` in a task (handlers without one)."""

        def receive(data: bytes, client: Client, done: ReplyCallback) -> None:
            self.spawn(_settle_with(handle, data, client, done))

        return receive

    async def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def _settle_with(handle: QueryHandler, data: bytes, client: Client,
                       done: ReplyCallback) -> None:
    try:
        reply = await handle(data, client)
    except Exception:  # the handler guards itself; this is the last line
        log.exception("handler failed")
        reply = None
    done(reply)


# --- UDP --------------------------------------------------------------------------------------


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, receive: QueryReceiver, tasks: TaskSet, local: tuple[str, int],
                 sock: socket.socket) -> None:
        self._receive = receive
        self._tasks = tasks
        self._local = local
        self._sock = sock
        self._transport: asyncio.DatagramTransport | None = None
        self._reply_sock: socket.socket | None = None  # for answers once reading has stopped

    def stop_reading(self) -> None:
        """Stop taking datagrams (a successor reads the socket now) but keep answering the
        queries in flight, from a duplicate of the socket that nobody reads."""
        if self._transport is None:
            return
        self._reply_sock = self._sock.dup()
        self._transport.close()
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._reply_sock is not None:
            self._reply_sock.close()
            self._reply_sock = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() makes a getpid() system call every time (its fork
        # check), one per datagram here.
        self._call_soon = asyncio.get_running_loop().call_soon

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Handled once the loop has read this batch, not inside the read: the order the task
        # per datagram had, at the cost of a callback handle instead of a task. (Handling it
        # inside the read measured no cheaper under dnsperf, within this VM's noise.)
        self._tasks.receiving += 1
        self._call_soon(self._serve, data, addr)

    def _serve(self, data: bytes, addr: Any) -> None:
        try:
            self._receive(data, Client(addr[0], addr[1], "udp", self._local),
                          functools.partial(self._reply, addr))
        except Exception:  # the receiver guards itself; this is the last line
            log.exception("udp receiver failed")
            self._tasks.receiving -= 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to clients that went away: nothing to do, nothing to stop.
        log.debug("udp listener %s: %s", self._local, exc)

    def _reply(self, addr: Any, reply: bytes | None) -> None:
        self._tasks.receiving -= 1
        if reply is None:
            return
        if self._transport is not None:
            self._transport.sendto(reply, addr)
        elif self._reply_sock is not None:
            try:
                self._reply_sock.sendto(reply, addr)
            except OSError as error:  # a full buffer or a vanished client: it retries
                log.debug("udp reply after handover: %s", error)


# --- TCP --------------------------------------------------------------------------------------


class _TcpConnection(asyncio.Protocol):
    def __init__(self, listener: _TcpListener) -> None:
        self._listener = listener
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._client: Client | None = None
        self._in_flight = 0
        self._reading = True
        self._write_blocked_since: float | None = None  # the client stopped reading answers
        self.last_activity = time.monotonic()
        self.partial_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        listener = self._listener
        if len(listener.connections) >= listener.limits.tcp_max_connections:
            listener.metrics.tcp_closed.labels("limit").inc()
            transport.abort()  # type: ignore[attr-defined]
            self._transport = None
            return
        peer = transport.get_extra_info("peername")
        local = listener.local
        if local is None:  # transparent: the connection's own address is the one the pod asked
            sockname = transport.get_extra_info("sockname")
            local = (sockname[0], sockname[1])
        self._client = Client(peer[0], peer[1], "tcp", local)
        # Answers a client does not read pile up here at most up to this much, then the
        # connection stops being read (see pause_writing).
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        listener.connections.add(self)
        listener.metrics.tcp_connections.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._listener.connections:
            self._listener.connections.discard(self)
            self._listener.metrics.tcp_connections.dec()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self.last_activity = time.monotonic()
        self._buffer += data
        self._dispatch_buffered()

    def _dispatch_buffered(self) -> None:
        """Hand every complete message on, up to the per-connection in-flight cap."""
        buffer = self._buffer
        cap = self._listener.limits.tcp_max_queries_per_connection
        while len(buffer) >= 2 and self._in_flight < cap and self._write_blocked_since is None:
            (length,) = struct.unpack_from("!H", buffer)
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            self._in_flight += 1
            assert self._client is not None
            self._listener.tasks.spawn(self._serve(message, self._client))
        self._update_reading()
        # Only an incomplete message can stall; complete ones waiting for room cannot.
        waiting = len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]
        if not buffer or waiting:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = time.monotonic()

    async def _serve(self, message: bytes, client: Client) -> None:
        try:
            reply = await self._listener.handle(message, client)
        except Exception:
            log.exception("tcp handler failed")
            reply = None
        finally:
            self._in_flight -= 1
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if reply is not None:
            transport.write(struct.pack("!H", len(reply)) + reply)
            self.last_activity = time.monotonic()
        self._dispatch_buffered()

    # Back-pressure, not drops: a connection is read only while it has room for more queries
    # in flight and its client reads the answers (the transport's write buffer is below its
    # high-water mark).

    def pause_writing(self) -> None:
        self._write_blocked_since = time.monotonic()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked_since = None
        self._dispatch_buffered()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        room = self._in_flight < self._listener.limits.tcp_max_queries_per_connection
        wanted = room and self._write_blocked_since is None
        if wanted != self._reading:
            self._reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def check_timers(self, now: float) -> None:
        """Close the connection if it idled or a partial message stalled."""
        if self._transport is None:
            return
        limits = self._listener.limits
        reason = None
        if self.partial_since is not None and now - self.partial_since > limits.tcp_message_timeout:
            reason = "stalled"
        elif (self._write_blocked_since is not None
              and now - self._write_blocked_since > limits.tcp_idle_timeout):
            reason = "not_reading"
        elif self._in_flight == 0 and now - self.last_activity > limits.tcp_idle_timeout:
            reason = "idle"
        if reason is not None:
            self._listener.metrics.tcp_closed.labels(reason).inc()
            # abort, not close: close would wait for unread answers to drain, forever.
            self._transport.abort()
            self._transport = None


class _TcpListener:
    def __init__(self, handle: QueryHandler, tasks: TaskSet, local: tuple[str, int] | None,
                 limits: ListenerLimits, metrics: Metrics) -> None:
        self.handle = handle
        self.tasks = tasks
        self.local = local
        self.limits = limits
        self.metrics = metrics
        self.connections: set[_TcpConnection] = set()

    def protocol(self) -> _TcpConnection:
        return _TcpConnection(self)

    def check_timers(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections):
            connection.check_timers(now)


# --- the server -------------------------------------------------------------------------------


def _bind(ip: str, port: int, kind: int, transparent: bool = False,
          workers: int = 1) -> socket.socket:
    """A non-blocking socket bound to ``ip``:``port``; with ``workers`` > 1, one of the group
    of DNS worker processes on that address, among which the kernel spreads datagrams and
    connections (dns/reuseport.py)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if workers > 1:
            reuseport.share(sock)
        if transparent:
            transparent_mod.make_transparent(sock, family)
        if family == socket.AF_INET6:
            # [::]:53 and 0.0.0.0:53 are separate listeners, as configured.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        if workers > 1:
            reuseport.spread(sock, workers)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_pair(ip: str, port: int, tcp: bool,
               workers: int = 1) -> tuple[socket.socket, socket.socket | None]:
    """A UDP socket and (if ``tcp``) a TCP socket on the same ``ip``:``port``.

    Port 0 lets the kernel pick the UDP port, which TCP then takes too; if that port happens to
    be busy for TCP, another is tried.
    """
    attempts = 20 if port == 0 else 1
    for attempt in range(attempts):
        udp = _bind(ip, port, socket.SOCK_DGRAM, workers=workers)
        if not tcp:
            return udp, None
        try:
            return udp, _bind(ip, udp.getsockname()[1], socket.SOCK_STREAM, workers=workers)
        except OSError:
            udp.close()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ListenerSocket:
    """One bound listening socket, as handed to a successor on a restart (see handover.py)."""

    kind: str  # "udp", "tcp", "udp-transparent", "tcp-transparent"
    ip: str
    port: int
    sock: socket.socket

    def serves(self, kind: str, ip: str, port: int) -> bool:
        """Whether this socket can stand for a configured ``kind`` listener on ``ip``:``port``
        (port 0 accepts whatever port the predecessor was given)."""
        return self.kind == kind and self.ip == ip and port in (0, self.port)


RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes; absorbs bursts and a restart's handover pause


def _queued(sock: socket.socket) -> int:
    """Bytes of the next datagram waiting unread in a UDP socket (0: none)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Raise a UDP listener's receive buffer (past rmem_max as root), best effort."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            return
        except OSError:
            continue


class DnsServer:
    """The UDP and TCP listeners on every configured address."""

    def __init__(self, addresses: list[tuple[str, int]], handle: QueryHandler, metrics: Metrics,
                 limits: ListenerLimits, tcp: bool = True,
                 transparent: list[tuple[str, int]] | None = None,
                 receive: QueryReceiver | None = None, workers: int = 1) -> None:
        """``handle`` serves TCP, and UDP too unless ``receive`` (the same handler's callback
        entry, ``Proxy.receive``) is given. ``workers`` > 1: every listener joins the group of
        that many DNS worker processes on its address (``dns.workers``)."""
        self._addresses = addresses
        self._transparent = transparent or []  # TPROXY targets (see dns/transparent.py)
        self._handle = handle
        self._metrics = metrics
        self._limits = limits
        self._tcp = tcp
        self._workers = workers
        self.tasks = TaskSet()
        self._receive = receive or self.tasks.receiver(handle)
        self.bound: list[tuple[str, str, int]] = []  # (protocol, ip, port) actually bound
        self.sockets: list[ListenerSocket] = []  # what a successor agent takes over
        self._inherited: list[ListenerSocket] = []
        self._closers: list[Callable[[], Any]] = []
        self._udp_listeners: list[_UdpListener] = []
        self._tcp_listeners: list[_TcpListener] = []
        self._timer_task: asyncio.Task[None] | None = None

    async def start(self, inherited: list[ListenerSocket] | None = None) -> None:
        """Bind every listener, or take it from ``inherited`` (a predecessor's sockets).

        Raises:
            OSError: an address could not be bound (in use, not local, no permission).
        """
        loop = asyncio.get_running_loop()
        self._inherited = list(inherited or [])
        for ip, port in self._addresses:
            udp_sock = self._take("udp", ip, port)
            tcp_sock = self._take("tcp", ip, port) if self._tcp else None
            if udp_sock is None or (self._tcp and tcp_sock is None):
                for sock in (udp_sock, tcp_sock):
                    if sock is not None:
                        sock.close()
                udp_sock, tcp_sock = _bind_pair(ip, port, self._tcp, self._workers)
            _grow_receive_buffer(udp_sock)
            port = udp_sock.getsockname()[1]
            local = (ip, port)
            _, udp_listener = await loop.create_datagram_endpoint(
                lambda local=local, sock=udp_sock: _UdpListener(self._receive, self.tasks, local,
                                                                sock),
                sock=udp_sock)
            self._udp_listeners.append(udp_listener)
            self.bound.append(("udp", ip, port))
            self.sockets.append(ListenerSocket("udp", ip, port, udp_sock))
            if tcp_sock is not None:
                listener = _TcpListener(self._handle, self.tasks, local, self._limits,
                                        self._metrics)
                server = await loop.create_server(listener.protocol, sock=tcp_sock, backlog=1024)
                self._closers.append(server.close)
                self._tcp_listeners.append(listener)
                self.bound.append(("tcp", ip, port))
                self.sockets.append(ListenerSocket("tcp", ip, port, tcp_sock))
        for ip, port in self._transparent:
            await self._start_transparent(ip, port)
        for leftover in self._inherited:  # listeners the configuration no longer has
            leftover.sock.close()
        self._inherited = []
        if self._tcp_listeners:
            self._timer_task = loop.create_task(self._check_timers_forever())

    async def _start_transparent(self, ip: str, port: int) -> None:
        """UDP and TCP listeners for queries TPROXY redirects to ``ip``:``port``."""
        udp_sock = (self._take("udp-transparent", ip, port)
                    or _bind(ip, port, socket.SOCK_DGRAM, transparent=True,
                             workers=self._workers))
        transparent_mod.report_original_destination(udp_sock)
        _grow_receive_buffer(udp_sock)
        udp = transparent_mod.TransparentUdpListener(udp_sock, self._receive, self.tasks,
                                                     self._metrics)
        udp.start()
        self._closers.append(udp.close)
        self.bound.append(("udp-transparent", ip, port))
        self.sockets.append(ListenerSocket("udp-transparent", ip, port, udp_sock))
        tcp_sock = (self._take("tcp-transparent", ip, port)
                    or _bind(ip, port, socket.SOCK_STREAM, transparent=True,
                             workers=self._workers))
        # An accepted connection's local address is the original destination: the listener
        # reads it per connection instead of using its own address.
        listener = _TcpListener(self._handle, self.tasks, None, self._limits, self._metrics)
        server = await asyncio.get_running_loop().create_server(
            listener.protocol, sock=tcp_sock, backlog=1024)
        self._closers.append(server.close)
        self._tcp_listeners.append(listener)
        self.bound.append(("tcp-transparent", ip, port))
        self.sockets.append(ListenerSocket("tcp-transparent", ip, port, tcp_sock))

    def _take(self, kind: str, ip: str, port: int) -> socket.socket | None:
        """The inherited socket for this listener, if the predecessor had one."""
        for index, candidate in enumerate(self._inherited):
            if candidate.serves(kind, ip, port):
                del self._inherited[index]
                candidate.sock.setblocking(False)
                return candidate.sock
        return None

    def stop_listening(self) -> None:
        """Close this process's listening sockets (a successor holds its own copies); the
        queries in flight and the client TCP connections carry on."""
        if self._timer_task is not None:
            self._timer_task.cancel()
            self._timer_task = None
        for udp in self._udp_listeners:
            udp.stop_reading()
        for close in self._closers:
            close()
        self._closers = []

    async def leave(self, timeout: float, poll: float = 0.001) -> None:
        """Stop as one of several processes sharing the listeners (``workers``): close
        them at a moment this process holds no query, then finish nothing more.

        Closing takes a socket out of the kernel's group, which then hands new queries to the
        other processes; what was queued in it is lost. So the sockets stay open, read and
        answered, until a poll finds no datagram waiting in them or held here and no query in
        flight, at most ``timeout`` seconds; they are closed in that same step, so only a
        datagram arriving in those microseconds can be lost (the client retries it).
        """
        deadline = time.monotonic() + timeout
        while ((self.tasks.receiving or self.tasks.tasks
                or any(_queued(s.sock) for s in self.sockets if s.kind.startswith("udp")))
               and time.monotonic() < deadline):
            await asyncio.sleep(poll)
        if self._timer_task is not None:
            self._timer_task.cancel()
            self._timer_task = None
        for close in self._closers:
            close()
        self._closers = []
        for udp in self._udp_listeners:
            udp.close()

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the queries in flight to finish."""
        deadline = time.monotonic() + timeout
        if self.tasks.tasks:
            await asyncio.wait(list(self.tasks.tasks), timeout=timeout)
        # Datagrams a receiver holds have no task to wait on: poll their count. Each settles
        # within the upstream timeout, which ``timeout`` covers.
        while self.tasks.receiving > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _check_timers_forever(self) -> None:
        tick = min(self._limits.tcp_idle_timeout, self._limits.tcp_message_timeout) / 4
        while True:
            await asyncio.sleep(max(0.01, tick))
            for listener in self._tcp_listeners:
                listener.check_timers()

    async def stop(self) -> None:
        """Stop listening, close client connections and cancel queries in flight."""
        if self._timer_task is not None:
            self._timer_task.cancel()
        for close in self._closers:
            close()
        for udp in self._udp_listeners:
            udp.close()
        for listener in self._tcp_listeners:
            for connection in list(listener.connections):
                connection.close()
        await self.tasks.cancel_all()
