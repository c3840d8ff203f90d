"""Runs ``fqdnproxy run`` as a child process and waits until it listens (demo, tests, benchmarks).

Readiness is read from the agent's own log ("listening on udp 127.0.0.1:5353"), never guessed
with a sleep, so port 0 works: the bound addresses are reported in ``addresses``.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Sequence

from fqdnproxy.errors import FqdnproxyError

_LISTENING = re.compile(r"listening on (udp|tcp) \[?([0-9a-fA-F:.]+?)\]?:(\d+)$")
_READY = "forwarding to"


class AgentProcessError(FqdnproxyError):
    """The agent process did not start."""


@dataclass
class AgentProcess:
    """``python -m fqdnproxy run ARGS`` with its stderr log kept in ``log``."""

    args: Sequence[str]
    start_timeout: float = 15.0
    stop_timeout: float = 10.0
    netns: str | None = None
    env: dict[str, str] | None = None
    entry: Sequence[str] = ("-m", "fqdnproxy", "run")  # what the interpreter runs, before args
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)  # "udp 127.0.0.1" -> addr
    log: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _reader: threading.Thread | None = field(default=None, init=False, repr=False)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue, init=False, repr=False)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def address(self, protocol: str = "udp", ip: str = "127.0.0.1") -> tuple[str, int]:
        return self.addresses[f"{protocol} {ip}"]

    def start(self) -> AgentProcess:
        """Start the agent and wait until it reports its listeners.

        Raises:
            AgentProcessError: it exited or said nothing in time; the message has its log.
        """
        command = [sys.executable, *self.entry, *self.args]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, **(self.env or {})})
        # One reader thread for the whole life of the process: the agent never blocks on a full
        # pipe, and start() waits on a queue with a deadline rather than on a blocking read.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break  # the agent exited
            match = _LISTENING.search(line)
            if match:
                protocol, ip, port = match.groups()
                self.addresses[f"{protocol} {ip}"] = (ip, int(port))
            if _READY in line:
                return self
        self.stop()
        raise AgentProcessError("agent did not become ready:\n" + "\n".join(self.log))

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Wait until the agent has logged a line containing ``text`` (at any time since it
        started); return the first such line.

        Raises:
            AgentProcessError: it exited, or said nothing of the kind in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in list(self.log) if text in line), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)  # wakes on every new line
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)  # the next wait_for fails at once too
                if not any(text in logged for logged in self.log):
                    break
        raise AgentProcessError(f"the agent did not log {text!r}:\n" + "\n".join(self.log))

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.log.append(line.rstrip("\n"))
            self._lines.put(self.log[-1])
        self._lines.put(None)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the agent."""
        assert self._proc is not None
        self._proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the agent, wait for it (SIGKILL after ``stop_timeout``); its exit status."""
        proc = self._proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
