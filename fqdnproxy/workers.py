"""DNS worker processes (``dns.workers``): which one this process is, and the primary's
supervisor that starts, restarts and stops the others.

One Python process answers DNS on one core. With ``dns.workers`` N > 1 the agent (worker 0, the
primary) runs N - 1 more processes of itself, worker 1 to N - 1, with the same command line and
configuration. Every worker binds the same listeners with SO_REUSEPORT, so the kernel spreads
queries over them (at random per datagram, or by a hash of the 4-tuple under TPROXY:
dns/reuseport.py), and runs the whole query path: decide, forward, learn, release, audit,
metrics.

What keeps them from stepping on each other: each worker keeps its own FQDN cache and writes
its own exact allow map (``allow_exact`` for worker 0, ``allow_exact_k`` for worker k, pinned
beside the others). The program, compiled for N workers, judges a new connection against all N:
an address any worker learned for the endpoint admits it (bpf/fqdn_egress.c, ``judge``). So no
two processes ever write one map entry, and the entry of an (endpoint, IP) stays the merge of
the names one cache holds, as with one process. What the datapath allows is the union of what
the workers learned, each under the current policy, until it expires.

The primary alone owns what exists once per node: the program (compile, attach), the policy's
kernel maps (endpoints, static rules, DNS targets), the TPROXY redirection, drop events and
the handover to a successor; its admin socket asks the workers' own (admin/commands.py) for what
each holds alone. A worker loads the policy files and the inventory
itself, reloads them on change and re-evaluates its own cache; restores its own snapshot
(``state.directory``/worker-k) and map at start; serves /metrics on ``metrics.listen``'s port
+ k; and appends to the same audit log.

One process is worker k at a time: a worker holds a lock (``state.directory``/worker-k/lock)
for as long as it runs, and a new worker k waits for it. After a handover the successor's
workers start while the old agent's are still draining; each waits for its predecessor to exit
before it restores the snapshot and the map it takes over.

Supervision: a worker that exits is started again after a pause (1 s, doubling up to 30 s; back
to 1 s once a worker has run a minute); the primary stops the workers (SIGTERM, then SIGKILL after
a grace period) when it stops, and a worker dies with the primary (PR_SET_PDEATHSIG) should the
primary be killed outright.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fqdnproxy.datapath.maps import MAX_WORKERS
from fqdnproxy.errors import FqdnproxyError

log = logging.getLogger("fqdnproxy.workers")

WORKER_ENV = "FQDNPROXY_WORKER"  # set by the supervisor: the index of the worker it starts
_PR_SET_PDEATHSIG = 1


class WorkerError(FqdnproxyError):
    """A worker process could not be set up."""


def this_worker() -> int:
    """This process's worker index: 0 for the primary (no ``FQDNPROXY_WORKER``).

    Raises:
        WorkerError: the variable is not an index below MAX_WORKERS.
    """
    text = os.environ.get(WORKER_ENV, "")
    if not text:
        return 0
    try:
        index = int(text)
    except ValueError:
        index = -1
    if not 0 < index < MAX_WORKERS:
        raise WorkerError(f"{WORKER_ENV}={text!r}: not a worker index 1..{MAX_WORKERS - 1}")
    return index


def die_with_parent() -> None:
    """Make the kernel SIGTERM this process when its parent (the primary) exits; if the
    primary is gone already, stop at once.

    Raises:
        WorkerError: prctl failed, or the primary has exited.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise WorkerError(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if parent == 1 or os.getppid() != parent:
        raise WorkerError("the primary agent has exited")


def claim(directory: Path, timeout: float, poll: float = 0.1) -> int:
    """Take the lock of the worker whose state lives in ``directory``, waiting up to
    ``timeout`` seconds for the process that holds it to exit; return the lock's fd, to keep
    open for the life of this process (the kernel releases it when the process ends, however).

    Blocking: call it from a thread.

    Raises:
        WorkerError: another process still holds it after ``timeout`` seconds.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise WorkerError(f"{directory}: another process is still this worker after "
                                  f"{timeout:.0f} s") from None
            time.sleep(poll)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = 1.0


@dataclass
class WorkerSupervisor:
    """Runs workers 1 to ``count`` - 1 as ``command`` (this agent's own command line)."""

    count: int
    command: Sequence[str]
    restarted: Callable[[int], None] = lambda index: None  # a worker was started again
    grace: float = 10.0  # s between SIGTERM and SIGKILL when stopping
    _workers: list[_Worker] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> None:
        """Start every worker and watch it (on the running loop)."""
        loop = asyncio.get_running_loop()
        for index in range(1, self.count):
            worker = _Worker(index)
            self._workers.append(worker)
            self._tasks.append(loop.create_task(self._keep_running(worker)))

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the workers running now."""
        return {w.index: w.process.pid for w in self._workers
                if w.process is not None and w.process.returncode is None}

    async def stop(self) -> None:
        """SIGTERM every worker, wait up to ``grace`` seconds, SIGKILL what is left."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [w.process for w in self._workers
                   if w.process is not None and w.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), self.grace)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop in %.0f s: killed", process.pid,
                                self.grace)
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))

    async def _keep_running(self, worker: _Worker) -> None:
        while not self._stopping:
            env = {**os.environ, WORKER_ENV: str(worker.index)}
            try:
                worker.process = await asyncio.create_subprocess_exec(*self.command, env=env)
            except OSError as error:
                log.error("worker %d: cannot start %s: %s", worker.index, self.command[0], error)
            else:
                worker.started = time.monotonic()
                log.info("worker %d started (pid %d)", worker.index, worker.process.pid)
                status = await worker.process.wait()
                if self._stopping:
                    return
                log.error("worker %d (pid %d) exited with status %s; starting it again in %.0f s",
                          worker.index, worker.process.pid, status, worker.backoff)
            if time.monotonic() - worker.started > 60:
                worker.backoff = 1.0  # it ran a while: not a crash loop
            await asyncio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, 30.0)
            self.restarted(worker.index)
