"""The CLI's side of the admin API: one request to the running agent's socket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson

from fqdnproxy.errors import FqdnproxyError

TIMEOUT = 30.0  # s; a large cache listing takes a moment to render


class AdminError(FqdnproxyError):
    """The agent could not be asked, or answered with an error."""


def answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (a connection that
    says nothing is ignored by the agent's servers)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def call(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """Send one command to the agent listening on ``path``; its result.

    Raises:
        AdminError: no agent listens there, or it reported an error.
    """
    request = orjson.dumps({"command": command, "args": args or {}}) + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
    except FileNotFoundError:
        raise AdminError(f"no agent socket at {path}: is `fqdnproxy run` running?") from None
    except OSError as error:
        raise AdminError(f"cannot talk to the agent at {path}: {error}") from None
    try:
        response = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise AdminError(f"the agent at {path} sent an unreadable answer") from None
    if not response.get("ok"):
        raise AdminError(response.get("error", "the agent reported an error"))
    return response.get("result")
