"""The upstream client: forwards a query and accepts only the answer it asked for.

Spoofing defence (DESIGN.md step 5): a pod must never be able to inject IPs into its own allow
map, so every forwarded query gets a fresh random 16-bit ID and leaves from one of a pool of UDP
sockets, each on its own kernel-chosen random source port and *connected* to the server asked
(the kernel then drops datagrams from any other address). Sockets are rotated onto new random
ports after ``socket_max_queries`` queries or ``socket_max_age`` seconds. An answer is accepted
only with the ID asked, the QR bit set and the same question (name compared case-insensitively,
type, class); anything else is dropped and counted in ``fqdnproxy_upstream_stray_answers``.

Each query settles through a callback, ``on_answer(answer, error)``, called exactly once: no
future, task or coroutine per query on the UDP path (``exchange_udp`` wraps it in a future for
callers that would rather await). Timeouts cost no timer per query: every query waiting is in
one ordered dict in send order, and since every query has the same timeout, a sweeper that pops
from the front finds every expired query in O(expired). A query leaves it as soon as it settles:
kept until its deadline (2 s), each exchange would outlive two collections and reach the
collector's oldest generation, making full collections, and their pauses, more frequent.

Errors: ``UpstreamTimeout`` means no answer (the proxy stays silent, the client retries);
``UpstreamUnreachable`` (ICMP port unreachable, TCP reset or refusal) and ``UpstreamBadAnswer``
become SERVFAIL.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from fqdnproxy.dns import wire
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.observe.metrics import Metrics

Server = tuple[str, int]


class UpstreamError(FqdnproxyError):
    """The upstream exchange failed."""

    reason = "error"


class UpstreamTimeout(UpstreamError):
    """No acceptable answer arrived in time."""

    reason = "timeout"


class UpstreamUnreachable(UpstreamError):
    """The upstream refused, reset or could not be reached."""

    reason = "unreachable"


class UpstreamBadAnswer(UpstreamError):
    """The upstream's answer could not be accepted."""

    reason = "bad_answer"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How queries are sent; see ``config.UpstreamConfig`` for the documented defaults."""

    timeout: float = 2.0
    sockets_per_server: int = 16
    socket_max_queries: int = 2_000
    socket_max_age: float = 60.0
    max_servers: int = 256


class RandomStream:
    """Unpredictable 16-bit numbers from the OS, read in blocks to keep syscalls off each query."""

    BLOCK = 4096

    def __init__(self) -> None:
        self._values: list[int] = []

    def next16(self) -> int:
        """A fresh random number in 0..65535."""
        if not self._values:
            block = os.urandom(self.BLOCK)
            self._values = list(struct.unpack(f"!{self.BLOCK // 2}H", block))
        return self._values.pop()


AnswerCallback = Callable[[bytes | None, "UpstreamError | None"], None]
"""Settles one query: ``(answer, None)`` or ``(None, error)``. It must not raise."""


def _settled(answer: bytes | None, error: UpstreamError | None) -> None:
    """The callback of a query already settled."""


Waiting = collections.OrderedDict["_Pending", None]


class _Pending:
    """One query waiting for its answer on one socket."""

    __slots__ = ("on_answer", "question", "deadline", "owner", "query_id", "waiting")

    def __init__(self, on_answer: AnswerCallback, question: bytes, deadline: float,
                 owner: _UpstreamSocket, query_id: int, waiting: Waiting) -> None:
        self.on_answer = on_answer
        self.question = question
        self.deadline = deadline
        self.owner = owner
        self.query_id = query_id
        self.waiting = waiting  # the client's queries in deadline order; this one among them
        waiting[self] = None

    def settle(self, answer: bytes | None, error: UpstreamError | None) -> None:
        """Hand the outcome on, once, and leave the deadline order."""
        self.waiting.pop(self, None)
        on_answer = self.on_answer
        self.on_answer = _settled
        on_answer(answer, error)


def question_key(query: wire.Query, data: bytes) -> bytes:
    """The query's question section with its name lowercased: what a genuine answer must echo.

    Comparing raw bytes is exact and cheap: the question is the first name in the message, so
    it can never be compressed, and DNS names compare case-insensitively in ASCII only
    (RFC 4343), which is what ``bytes.lower`` does. Type and class are compared as they are:
    lowercasing their bytes would take type 97 for 65 (HTTPS), 0x61 for 0x41.
    """
    return _question_section_key(data[wire.HEADER_SIZE:query.question_end])


def _question_section_key(section: bytes) -> bytes:
    """A question section (name, type, class) with the name's ASCII letters lowercased."""
    return section[:-4].lower() + section[-4:]


def check_answer(data: bytes, query_id: int, question: bytes) -> str | None:
    """Why ``data`` is not the answer to (``query_id``, ``question``), or None if it is.

    ``question`` is ``question_key`` of the query asked.
    """
    end = wire.HEADER_SIZE + len(question)
    if len(data) < end:
        return "unreadable"
    if (data[0] << 8) | data[1] != query_id:
        return "unknown_id"
    if not data[2] & 0x80:
        return "not_response"
    if (data[4:6] != b"\x00\x01"
            or _question_section_key(data[wire.HEADER_SIZE:end]) != question):
        return "wrong_question"
    return None


class _UpstreamSocket(asyncio.DatagramProtocol):
    """A UDP socket connected to one server, on its own random source port."""

    def __init__(self, pool: _ServerPool) -> None:
        self.pool = pool
        self.pending: dict[int, _Pending] = {}
        self.sent = 0
        self.created = time.monotonic()
        self.retired = False
        self.transport: asyncio.DatagramTransport | None = None

    # asyncio callbacks: frame bytes and hand them on, nothing more.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.pool.client.answer_received(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        # A connected UDP socket reports ICMP errors from its one server: every query waiting
        # on it is doomed (port closed, host unreachable), so fail them now rather than time out.
        self.pool.client.socket_failed(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_all(UpstreamUnreachable("upstream socket closed"))

    def fail_all(self, error: UpstreamError) -> None:
        waiting = list(self.pending.values())
        self.pending.clear()  # before the callbacks: each query settles exactly once
        for pending in waiting:
            pending.settle(None, error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _ServerPool:
    """The rotating UDP sockets for one upstream server."""

    def __init__(self, client: UpstreamClient, server: Server) -> None:
        self.client = client
        self.server = server
        self.sockets: list[_UpstreamSocket] = []
        self.retiring: set[_UpstreamSocket] = set()
        self.closed = False
        self._filling: asyncio.Lock = asyncio.Lock()

    async def fill(self) -> None:
        """Open sockets until the pool has its full count (none once the pool is closed)."""
        async with self._filling:
            while not self.closed and len(self.sockets) < self.client.settings.sockets_per_server:
                sock = await self._open()
                if self.closed:  # evicted or shut down while the socket was being opened
                    sock.close()
                    self.client.metrics.upstream_sockets.dec()
                    break
                self.sockets.append(sock)

    async def _open(self) -> _UpstreamSocket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _UpstreamSocket(self), remote_addr=self.server, family=family)
        except OSError as error:
            raise UpstreamUnreachable(f"cannot open a socket to {self.server}: {error}") from None
        self.client.metrics.upstream_sockets.inc()
        return protocol

    def retire(self, sock: _UpstreamSocket) -> None:
        """Take ``sock`` out of rotation; it closes once its last query is settled."""
        if sock.retired:
            return
        sock.retired = True
        self.sockets.remove(sock)
        self.retiring.add(sock)
        self.client.metrics.upstream_rotations.inc()
        self.close_if_idle(sock)
        self.client.spawn(self.fill())

    def close_if_idle(self, sock: _UpstreamSocket) -> None:
        if sock.retired and not sock.pending:
            self.retiring.discard(sock)
            sock.close()
            self.client.metrics.upstream_sockets.dec()

    def close(self) -> None:
        self.closed = True
        for sock in [*self.sockets, *self.retiring]:
            sock.fail_all(UpstreamUnreachable("upstream client closed"))
            sock.close()
            self.client.metrics.upstream_sockets.dec()
        self.sockets.clear()
        self.retiring.clear()

    @property
    def busy(self) -> bool:
        return (any(s.pending for s in self.sockets) or bool(self.retiring)
                or self._filling.locked())


class UpstreamClient:
    """Sends queries upstream over UDP (pooled, rotating sockets) or TCP (one connection each)."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._pools: collections.OrderedDict[Server, _ServerPool] = collections.OrderedDict()
        self._deadlines: Waiting = collections.OrderedDict()
        self._random = RandomStream()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the timeout sweeper."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """Fail every waiting query and close every socket."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved on purpose: a failed refill is retried by the next query

    # --- UDP ----------------------------------------------------------------------------------

    async def exchange_udp(self, server: Server, query: wire.Query, data: bytes) -> bytes:
        """Forward ``data`` to ``server`` over UDP; the answer, with the upstream's ID.

        Raises:
            UpstreamTimeout: no acceptable answer within the timeout.
            UpstreamUnreachable: the server refused or could not be reached.
        """
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def settle(answer: bytes | None, error: UpstreamError | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(answer)  # type: ignore[arg-type]

        self.send_udp(server, query, data, settle)
        return await future

    def send_udp(self, server: Server, query: wire.Query, data: bytes,
                 on_answer: AnswerCallback) -> None:
        """Forward ``data`` to ``server`` over UDP; ``on_answer`` settles it exactly once: with
        the answer (the upstream's ID), ``UpstreamTimeout`` or ``UpstreamUnreachable``. It may
        run before this returns (an event loop may report a failed send at once)."""
        pool = self._pools.get(server)
        if pool is None or not pool.sockets:  # the first query to this server, or a refill
            self.spawn(self._send_when_open(server, query, data, on_answer))
            return
        if len(self._pools) > 1:
            self._pools.move_to_end(server)  # LRU order, for the cap on servers
        self._send(pool, query, data, on_answer)

    async def _send_when_open(self, server: Server, query: wire.Query, data: bytes,
                              on_answer: AnswerCallback) -> None:
        try:
            pool = await self._pool(server)
        except UpstreamError as error:
            on_answer(None, error)
            return
        except asyncio.CancelledError:  # the client is closing
            on_answer(None, UpstreamUnreachable("upstream client closed"))
            raise
        if not pool.sockets:  # closed while it was being filled
            on_answer(None, UpstreamUnreachable(f"no socket to {server[0]}:{server[1]}"))
            return
        self._send(pool, query, data, on_answer)

    def _send(self, pool: _ServerPool, query: wire.Query, data: bytes,
              on_answer: AnswerCallback) -> None:
        sock = pool.sockets[self._random.next16() % len(pool.sockets)]
        query_id = self._random.next16()
        while query_id in sock.pending:
            query_id = self._random.next16()
        pending = _Pending(on_answer, question_key(query, data),
                           time.monotonic() + self.settings.timeout, sock, query_id,
                           self._deadlines)
        sock.pending[query_id] = pending
        try:
            assert sock.transport is not None
            sock.transport.sendto(wire.with_id(data, query_id))
        except Exception as error:  # registered, so it must settle here, once
            del sock.pending[query_id]
            pending.settle(None, UpstreamUnreachable(f"cannot send to {pool.server}: {error}"))
            return
        sock.sent += 1
        if (sock.sent >= self.settings.socket_max_queries
                or pending.deadline - sock.created > self.settings.socket_max_age):
            pool.retire(sock)

    async def _pool(self, server: Server) -> _ServerPool:
        pool = self._pools.get(server)
        if pool is None:
            pool = self._new_pool(server)
        else:
            self._pools.move_to_end(server)
        if not pool.sockets:
            await pool.fill()
        return pool

    def _new_pool(self, server: Server) -> _ServerPool:
        # Transparent mode forwards to whatever server a pod asked: keep the number of servers
        # with open sockets bounded, closing the least recently used idle one. When every pool
        # is busy the cap is exceeded rather than failing a query; busy pools are bounded by
        # the proxy's in-flight cap.
        if len(self._pools) >= self.settings.max_servers:
            for old_server, old_pool in self._pools.items():
                if not old_pool.busy:
                    old_pool.close()
                    del self._pools[old_server]
                    break
        pool = _ServerPool(self, server)
        self._pools[server] = pool
        return pool

    def answer_received(self, sock: _UpstreamSocket, data: bytes, addr: Any) -> None:
        """A datagram arrived on an upstream socket: settle the query it answers, or count it."""
        stray = self.metrics.upstream_stray
        if addr is not None and (addr[0], addr[1]) != sock.pool.server:
            stray.labels("wrong_source").inc()
            return
        if len(data) < 12:
            stray.labels("unreadable").inc()
            return
        pending = sock.pending.get((data[0] << 8) | data[1])
        if pending is None:
            stray.labels("unknown_id").inc()
            return
        reason = check_answer(data, pending.query_id, pending.question)
        if reason is not None:
            # Keep waiting: the real answer may still come, and a spoofer must not be able to
            # cancel a query by sending garbage with its ID.
            stray.labels(reason).inc()
            return
        del sock.pending[pending.query_id]
        sock.pool.close_if_idle(sock)
        pending.settle(data, None)

    def socket_failed(self, sock: _UpstreamSocket, error: Exception) -> None:
        """An ICMP error on a connected socket: fail its queries with SERVFAIL."""
        sock.fail_all(UpstreamUnreachable(f"{sock.pool.server[0]}:{sock.pool.server[1]}: {error}"))
        sock.pool.close_if_idle(sock)

    async def _sweep_forever(self) -> None:
        tick = min(0.05, self.settings.timeout / 4)
        while True:
            await asyncio.sleep(tick)
            self.expire(time.monotonic())

    def expire(self, now: float) -> int:
        """Fail every query whose deadline has passed; O(expired). Returns how many."""
        expired = 0
        deadlines = self._deadlines
        while deadlines:
            pending = next(iter(deadlines))
            if pending.deadline > now:
                break
            del deadlines[pending]
            owner = pending.owner
            if owner.pending.get(pending.query_id) is pending:
                del owner.pending[pending.query_id]
                owner.pool.close_if_idle(owner)
                pending.settle(None, UpstreamTimeout())
                expired += 1
        return expired

    # --- TCP ----------------------------------------------------------------------------------

    async def exchange_tcp(self, server: Server, query: wire.Query, data: bytes) -> bytes:
        """Forward ``data`` to ``server`` over a new TCP connection; the answer.

        Raises:
            UpstreamTimeout: no complete answer within the timeout.
            UpstreamUnreachable: connection refused or reset.
            UpstreamBadAnswer: the answer is not for the question asked.
        """
        query_id = self._random.next16()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.settings.timeout):
                reader, writer = await asyncio.open_connection(server[0], server[1])
                message = wire.with_id(data, query_id)
                writer.write(struct.pack("!H", len(message)) + message)
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                answer = await reader.readexactly(length)
        except TimeoutError:
            raise UpstreamTimeout() from None
        except (OSError, asyncio.IncompleteReadError) as error:
            raise UpstreamUnreachable(f"{server[0]}:{server[1]} over TCP: {error}") from None
        finally:
            if writer is not None:
                writer.close()
        reason = check_answer(answer, query_id, question_key(query, data))
        if reason is not None:
            self.metrics.upstream_stray.labels(reason).inc()
            raise UpstreamBadAnswer(f"TCP answer rejected: {reason}")
        return answer
