"""A real upstream DNS server for the lab, tests and benchmarks: knotd in the foreground.

Everything knot writes (config, storage, timers, pidfile, control socket, log) stays inside one
run directory, so the machine's /etc/knot and /var/lib/knot are never touched, and several servers
can run side by side. Zones are served read-only from copies of the given files.

    with KnotServer(listen=[("127.0.0.1", port), ("::1", port)], zones=[DEMO_ZONE]) as knot:
        ...  # knot answers SOA for every zone on every address here

``netns`` runs knotd inside a named network namespace (``ip netns exec NS knotd ...``); the
readiness probe then queries from inside that namespace too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dnslib

from fqdnproxy.errors import FqdnproxyError

ZONES_DIR = Path(__file__).parent / "zones"
DEMO_ZONE = ZONES_DIR / "demo.test.zone"

_CLONE_NEWNET = 0x40000000


class KnotError(FqdnproxyError):
    """knotd could not be started or did not become ready."""


@dataclass
class KnotServer:
    """One knotd process serving ``zones`` on ``listen`` addresses.

    A zone's name is its file name without ``.zone`` (``demo.test.zone`` serves ``demo.test.``).
    ``rundir`` None means a fresh temporary directory, removed on stop; a given one is kept.
    """

    listen: Sequence[tuple[str, int]]
    zones: Sequence[Path] = (DEMO_ZONE,)
    rundir: Path | None = None
    netns: str | None = None
    workers: int | None = None  # UDP and TCP workers each; None is knot's default (one per CPU)
    start_timeout: float = 10.0  # seconds until every zone answers on every address
    stop_timeout: float = 5.0  # seconds between SIGTERM and SIGKILL
    knotd: str = field(default_factory=lambda: shutil.which("knotd") or "/usr/sbin/knotd")

    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _dir: Path | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)

    @property
    def zone_names(self) -> list[str]:
        """The served zones' names, absolute (``demo.test.``)."""
        return [_zone_name(path) for path in self.zones]

    @property
    def config_path(self) -> Path:
        """The knotd configuration file in the run directory."""
        return self._run_dir() / "knot.conf"

    @property
    def log_path(self) -> Path:
        """knotd's stderr (its log), in the run directory."""
        return self._run_dir() / "knotd.log"

    @property
    def pid(self) -> int | None:
        """knotd's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Write the config, start knotd and wait until every zone answers SOA on every address.

        Raises:
            KnotError: knotd is missing, exited, or was not ready within ``start_timeout``;
                the message carries the end of knotd's log.
        """
        if self._proc is not None:
            raise KnotError("knotd already started")
        if not self.listen:
            raise KnotError("KnotServer needs at least one listen address")
        if not os.path.exists(self.knotd):
            raise KnotError(f"knotd not found ({self.knotd}); install knot (`make bootstrap`)")
        self._prepare_dir()
        self.config_path.write_text(self.render_config())
        argv = [self.knotd, "-c", str(self.config_path)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        # The log goes to a file, not a pipe: nobody drains a pipe during a long benchmark.
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop knotd (SIGTERM, then SIGKILL after ``stop_timeout``) and remove a temporary rundir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._own_dir = False

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def render_config(self) -> str:
        """Return the knotd configuration (YAML) for this server."""
        rundir = self._run_dir()
        listen = ", ".join(f'"{_knot_address(ip, port)}"' for ip, port in self.listen)
        lines = [
            "server:",
            f'    rundir: "{rundir}"',
            f'    pidfile: "{rundir / "knot.pid"}"',
            f"    listen: [ {listen} ]",
        ]
        if os.geteuid() == 0:
            # Stay root explicitly: the `knot` user of Debian's package could not read a private
            # rundir. Unprivileged callers keep their own user (setting one would fail).
            lines.append("    user: root:root")
        if self.workers is not None:
            lines += [
                f"    udp-workers: {self.workers}",
                f"    tcp-workers: {self.workers}",
                "    background-workers: 1",
            ]
        lines += [
            "",
            "control:",
            f'    listen: "{rundir / "knot.sock"}"',
            "",
            "database:",
            f'    storage: "{rundir / "db"}"',
            "",
            "log:",
            "  - target: stderr",
            "    any: info",
            "",
            "template:",
            "  - id: default",
            f'    storage: "{rundir / "zones"}"',
            "    zonefile-sync: -1",  # never write zones back
            "    zonefile-load: whole",
            "    journal-content: none",
            "    semantic-checks: on",
            "",
            "zone:",
        ]
        for path in self.zones:
            lines += [f'  - domain: "{_zone_name(path)}"', f'    file: "{path.name}"']
        return "\n".join(lines) + "\n"

    def _run_dir(self) -> Path:
        if self._dir is None:
            raise KnotError("knotd has no run directory before start()")
        return self._dir

    def _prepare_dir(self) -> None:
        if self.rundir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fqdnproxy-knot-"))
            self._own_dir = True
        else:
            self._dir = Path(self.rundir)
            self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / "db").mkdir(exist_ok=True)
        zones = self._dir / "zones"
        zones.mkdir(exist_ok=True)
        for path in self.zones:
            shutil.copyfile(path, zones / Path(path).name)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = [(addr, zone) for addr in self.listen for zone in self.zone_names]
        while pending:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise KnotError(
                    f"knotd exited with status {self._proc.returncode} during startup:\n"
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise KnotError(
                    f"knotd not ready after {self.start_timeout} s (no SOA answer for "
                    f"{', '.join(f'{z} at {_knot_address(*a)}' for a, z in pending)}):\n"
                    f"{self._log_tail()}"
                )
            pending = [(addr, zone) for addr, zone in pending if not self._answers_soa(addr, zone)]

    def _answers_soa(self, addr: tuple[str, int], zone: str) -> bool:
        query = dnslib.DNSRecord.question(zone, "SOA")
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        try:
            with _socket_in(self.netns, family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.2)
                sock.sendto(query.pack(), addr)
                reply = dnslib.DNSRecord.parse(sock.recv(65535))
        except (OSError, dnslib.DNSError):
            return False
        return (
            reply.header.id == query.header.id
            and reply.header.rcode == dnslib.RCODE.NOERROR
            and any(rr.rtype == dnslib.QTYPE.SOA for rr in reply.rr)
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, KnotError):
            return "(no knotd log)"
        return "\n".join(text.splitlines()[-lines:]) or "(knotd log is empty)"


def free_port(hosts: Sequence[str] = ("127.0.0.1", "::1"), attempts: int = 50) -> int:
    """Return a port free for both UDP and TCP on every one of ``hosts`` (racy, as all such are).

    Raises:
        KnotError: no such port found in ``attempts`` tries.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if all(_bindable(host, port, kind) for host in hosts for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)):
            return port
    raise KnotError(f"no port free on {', '.join(hosts)} after {attempts} tries")


def _bindable(host: str, port: int, kind: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as sock:
            sock.bind((host, port))
    except OSError:
        return False
    return True


def _zone_name(path: Path) -> str:
    name = Path(path).name
    name = name[: -len(".zone")] if name.endswith(".zone") else name
    return name.rstrip(".") + "."


def _knot_address(ip: str, port: int) -> str:
    return f"{ip}@{port}"


@contextlib.contextmanager
def _socket_in(netns: str | None, family: int, kind: int) -> Iterator[socket.socket]:
    """Open a socket in network namespace ``netns`` (None: this one); it stays there once made."""
    if netns is None:
        with socket.socket(family, kind) as sock:
            yield sock
        return
    # setns() moves only the calling thread; the socket keeps the namespace it was made in.
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{netns}", "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
        try:
            sock = socket.socket(family, kind)
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise KnotError(f"cannot return to the original network namespace: {os.strerror(err)}")
    with sock:
        yield sock
