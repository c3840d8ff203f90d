"""Long-lived lab processes: started inside a namespace, detached, logging to a file.

A lab outlives the command that built it (``fqdnproxy lab up`` returns), so its processes get
their own session and write to a log file rather than to a pipe nobody reads. Readiness is a
line the process itself prints (the agent's "forwarding to", the echo servers' "ready"), read
from that file as it grows.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fqdnproxy.errors import FqdnproxyError

POLL = 0.05  # seconds between looks at a growing log


class ProcessError(FqdnproxyError):
    """A lab process exited or did not become ready."""


def spawn(namespace: str, argv: Sequence[str], log_path: Path, ready: str, timeout: float,
          env: Mapping[str, str] | None = None) -> int:
    """Start ``argv`` in ``namespace``, detached, and wait for ``ready`` in its log; its pid.

    Raises:
        ProcessError: it exited, or printed no ``ready`` line within ``timeout`` seconds (then
            it is killed); the message carries the end of its log.
    """
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", namespace, *argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    offset = 0
    while True:
        text = log_path.read_text(errors="replace")
        if ready in text[offset:]:
            return proc.pid
        offset = max(0, len(text) - len(ready))
        if proc.poll() is not None:
            raise ProcessError(f"{argv[0]} exited with status {proc.returncode} in {namespace}:"
                               f"\n{tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ProcessError(f"{argv[0]} not ready after {timeout} s in {namespace}:\n"
                               f"{tail(log_path)}")
        time.sleep(POLL)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: no log)"


def command_line(pid: int) -> str:
    """``/proc/PID/cmdline`` with spaces, or '' when the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""
