"""Restart without losing DNS: a new agent takes the running agent's listening sockets.

A restart that closes the old sockets before the new ones exist drops every query in between,
and with SO_REUSEPORT the datagrams queued in a closing socket are dropped too. Instead the old
agent hands its sockets over (SCM_RIGHTS on a unix socket), so the kernel objects, and the
queries queued in them, never go away:

    new agent                                   old agent
    (policies, datapath, ... loaded)
    connect(handover socket), "takeover" ──►   write the cache snapshot
                                               stop its admin and handover sockets
                                    ◄──────    send the listening sockets + what they are
    restore the snapshot, serve on them        close its copies, finish what is in flight, exit

Between "takeover" and the new agent's first read, queries wait in the sockets' buffers (4 MB
each, see dns/server.py); nothing is dropped unless that pause outlasts the buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from fqdnproxy.admin import client
from fqdnproxy.dns.server import ListenerSocket
from fqdnproxy.errors import FqdnproxyError

log = logging.getLogger(__name__)

REQUEST = b"takeover\n"
MAX_SOCKETS = 64
TIMEOUT = 30.0  # s for the old agent to snapshot and answer


class HandoverError(FqdnproxyError):
    """The running agent could not hand its sockets over."""


def peer_running(path: Path) -> bool:
    """Whether an agent waits for a successor on ``path``."""
    return client.answers(path)


def take_over(path: Path, timeout: float = TIMEOUT) -> list[ListenerSocket] | None:
    """Ask the agent serving ``path`` for its listening sockets; None when no agent runs there.

    Blocking: run it in a thread.

    Raises:
        HandoverError: an agent answered but the handover failed.
    """
    if not path.is_socket():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket file left by an agent that was killed
        try:
            conn.sendall(REQUEST)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_SOCKETS)
        except OSError as error:
            raise HandoverError(f"handover from {path} failed: {error}") from None
    try:
        described = json.loads(message)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"handover from {path}: unreadable description") from None
    if len(described) != len(fds):
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"handover from {path}: {len(fds)} sockets for "
                            f"{len(described)} descriptions")
    return [ListenerSocket(kind, ip, port, socket.socket(fileno=fd))
            for (kind, ip, port), fd in zip(described, fds)]


class HandoverServer:
    """The running agent's side: waits for a successor and gives it the listeners."""

    def __init__(self, path: Path,
                 prepare: Callable[[], Awaitable[list[ListenerSocket]]],
                 handed: Callable[[], Awaitable[None]]) -> None:
        """``prepare`` readies the handover (snapshot, admin socket closed) and returns the
        sockets; ``handed`` runs once the successor has them (stop listening, drain, exit)."""
        self.path = path
        self._prepare = prepare
        self._handed = handed
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Listen on ``path`` (replacing a stale file left by a killed agent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(1)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def close(self) -> None:
        """Stop waiting for a successor and remove the socket file."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sock is not None:
            assert self._sock is not None
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                try:
                    request = await asyncio.wait_for(loop.sock_recv(conn, 64), 5.0)
                except (asyncio.TimeoutError, OSError):
                    continue
                if request != REQUEST:
                    continue
                sockets = await self._prepare()
                described = json.dumps([[s.kind, s.ip, s.port] for s in sockets]).encode()
                conn.setblocking(True)
                try:
                    socket.send_fds(conn, [described], [s.sock.fileno() for s in sockets])
                except OSError as error:
                    log.error("handover failed, serving on: %s", error)
                    continue
            log.info("handed %d listening sockets to the new agent", len(sockets))
            self.close()
            await self._handed()
            return
