"""The agent's side of the admin API: a unix-socket server dispatching to registered handlers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from fqdnproxy.admin import client

log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Any | Awaitable[Any]]
MAX_REQUEST = 64 * 1024  # bytes; requests are small commands
REQUEST_TIMEOUT = 5.0  # s to send a request line


class AdminServer:
    """Serves ``handlers`` (command name -> function of the request's args) on ``path``."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket (replacing a stale one left by a killed agent).

        Raises:
            OSError: the socket could not be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            if client.answers(self.path):
                raise OSError(f"{self.path} is in use: another agent is running")
            self.path.unlink()  # left by an agent that was killed
        old_umask = os.umask(0o077)  # the socket is created 0600
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            response = await self._dispatch(line)
            writer.write(orjson.dumps(response, default=str) + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = orjson.loads(line)
            command = request["command"]
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            return {"ok": False, "error": f"bad request: {error}"}
        handler = self._handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return {"ok": False, "error": f"unknown command {command!r}; known: {known}"}
        try:
            result = handler(args)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as error:  # an admin command must never take the agent down
            log.exception("admin command %s failed", command)
            return {"ok": False, "error": f"{command}: {error}"}
        return {"ok": True, "result": result}
