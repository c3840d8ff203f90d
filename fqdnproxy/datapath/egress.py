"""``EgressDatapath``: compile bpf/fqdn_egress.c, pin or reuse its maps, attach it, drive it.

    dp = EgressDatapath.load(Path("/sys/fs/bpf/fqdnproxy"), Options())   # compiles (seconds)
    dp.attach("lxc1234")                       # the endpoint's host-side veth
    dp.set_endpoint("192.0.2.10", 7, EndpointFlags.ENFORCE_EGRESS, ifindex)
    dp.upsert_allows([AllowEntry(7, "203.0.113.5/32", kernel_now_ns() + ttl_ns, ports)])

The maps outlive the process (pinned) and the program outlives it too (the tc filter holds it).
A new process's load() reuses the pins; its attach() replaces the program in place. A restart
need not wait for the compile: open() takes the pins over in milliseconds while the old program
goes on enforcing from them, and load_program() swaps this build's program in later:

    dp = EgressDatapath.open(pin_dir) or EgressDatapath.load(pin_dir)
    dp.upsert_allows(...)                       # read at once by the program already attached
    dp.attach("lxc1234")                        # remembered until the program is loaded
    await asyncio.to_thread(dp.load_program)    # compile, then replace on every interface
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fqdnproxy.datapath import attach as tc
from fqdnproxy.datapath import bpfsys, maps, pinned, toolchain
from fqdnproxy.datapath.allowmap import AllowEntry, AllowKey, Address, HostAllows
from fqdnproxy.datapath.events import DropEvent, DropEventReader
from fqdnproxy.datapath.metrics import DatapathMetrics
from fqdnproxy.errors import FqdnproxyError

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "fqdn_egress.c"
PROGRAM = "fqdn_egress"
DEFAULT_BPFFS = Path("/sys/fs/bpf")
NS = 1_000_000_000


class DatapathError(FqdnproxyError):
    """The datapath could not be loaded."""


@dataclass(frozen=True)
class Options:
    """Compile-time options of the program; each becomes a -D flag (see the C file's top)."""

    endpoints_max: int = 4096  # entries in `endpoints` and `ifaces`
    allow_max: int = 262144  # entries in `allow_exact`, and in `allow` (fixed when first pinned)
    ct_max: int = 262144  # flows in `ct` (LRU: the least recently seen go first)
    ct_tcp_idle_s: float = 6 * 3600  # an idle TCP flow needs a new allow hit after this
    ct_other_idle_s: float = 60  # same for UDP, ICMP and the rest
    events_per_sec: int = 100  # drop events per endpoint and second; the rest are counted
    record_flows: bool = True  # False only for benchmarks of the allow-lookup path
    workers: int = 1  # DNS workers: each has an exact allow map the program reads (maps.py)

    def cflags(self, pin_dir: Path) -> list[str]:
        """The -D flags for these options and ``pin_dir``."""
        return [
            f'-DFQDN_PIN_DIR="{pin_dir}"',
            f"-DFQDN_ENDPOINTS_MAX={self.endpoints_max}",
            f"-DFQDN_ALLOW_MAX={self.allow_max}",
            f"-DFQDN_CT_MAX={self.ct_max}",
            f"-DFQDN_CT_TCP_IDLE_NS={int(self.ct_tcp_idle_s * NS)}ULL",
            f"-DFQDN_CT_OTHER_IDLE_NS={int(self.ct_other_idle_s * NS)}ULL",
            f"-DFQDN_EVENTS_PER_SEC={self.events_per_sec}",
            f"-DFQDN_RECORD_FLOWS={int(self.record_flows)}",
            f"-DFQDN_WORKERS={self.workers}",
        ]


def ensure_bpffs(pin_dir: Path, mountpoint: Path = DEFAULT_BPFFS) -> None:
    """Make ``pin_dir`` exist on a bpf filesystem, mounting one on ``mountpoint`` if needed.

    Raises:
        DatapathError: ``pin_dir`` is outside ``mountpoint`` and not on bpffs.
    """
    if pin_dir.is_dir() and bpfsys.is_bpffs(pin_dir):
        return
    existing = next((p for p in (pin_dir, *pin_dir.parents) if p.exists()), None)
    if existing is not None and bpfsys.is_bpffs(existing):
        pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # on a bpffs mounted elsewhere
        return
    if not bpfsys.is_bpffs(mountpoint):
        if not (pin_dir == mountpoint or mountpoint in pin_dir.parents):
            raise DatapathError(f"{pin_dir} is not on a bpf filesystem, and not under {mountpoint}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        bpfsys.mount_bpffs(mountpoint)
    pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not bpfsys.is_bpffs(pin_dir):
        raise DatapathError(f"{pin_dir} is not on a bpf filesystem")


class _Program:
    """The compiled program inside bcc's ``BPF`` object (which also holds the ring buffer)."""

    def __init__(self, bpf: Any, fn: Any) -> None:
        self.bpf = bpf
        self.fn = fn

    @classmethod
    def compile(cls, source: Path, options: Options, pin_dir: Path) -> _Program:
        """Compile ``source`` with bcc (seconds of clang) and load it into the kernel.

        bcc creates the pinned maps that are missing and reuses those that exist.

        Raises:
            ToolchainError: bcc or the kernel headers are unusable, or the C does not compile.
            DatapathError: the kernel refused the program (the verifier's log is on stderr).
        """
        cflags = options.cflags(pin_dir) + maps.layout_cflags()
        bpf = toolchain.compile_program(source.read_text(), cflags)
        try:
            fn = bpf.load_func(PROGRAM.encode(), bpf.SCHED_CLS)
        except Exception as exc:  # bcc raises bare Exception when the kernel refuses
            bpf.cleanup()
            raise DatapathError(f"the kernel refused {PROGRAM}: {exc}") from exc
        return cls(bpf, fn)

    @property
    def fd(self) -> int:
        return int(self.fn.fd)

    def close(self) -> None:
        self.bpf.cleanup()


class EgressDatapath:
    """The egress program and its pinned maps, as one process drives them.

    Map operations (endpoints, allows, counters, GC) come from ``pinned.PinnedMaps`` and work
    the same from any process and at any time. Attach and drop events need the program, which
    this instance has from the start (``load``) or gains later (``open``, then
    ``load_program``):

    - ``load()`` compiles first; bcc creates the pins or reuses them. A first start needs this.
    - ``open()`` reuses pins that exist, without bcc, in milliseconds. The program an earlier
      process attached stays attached (the tc filter holds it) and goes on enforcing from these
      very maps, so what is written here takes effect at once. ``load_program()`` (seconds:
      run it in a thread) then compiles this build's program and replaces the old one on every
      interface ``attach()`` was asked for meanwhile.

    Thread-safe for attach/detach against ``load_program`` and ``close`` (one lock); map
    operations have one writer at a time, as before.
    """

    def __init__(self, maps_: pinned.PinnedMaps, options: Options, metrics: DatapathMetrics,
                 *, source: Path = SOURCE, program: _Program | None = None) -> None:
        self.maps = maps_
        self.options = options
        self.metrics = metrics
        self._source = source
        self._program = program
        self._lock = threading.Lock()
        self._wanted: dict[tuple[str | int, str | None], None] = {}  # attach() asked, in order
        self._closed = False
        self._cancelled = False  # cancel_load(): a compile under way must not attach
        self._reader: DropEventReader | None = None

    @classmethod
    def load(cls, pin_dir: str | Path = pinned.DEFAULT_PIN_DIR, options: Options = Options(),
             *, bpffs: Path = DEFAULT_BPFFS, metrics: DatapathMetrics | None = None,
             source: Path = SOURCE) -> EgressDatapath:
        """Compile and load the program, creating the pinned maps or reusing existing ones.

        Raises:
            LayoutMismatch: existing pins have another layout; the message says how to migrate.
            ToolchainError: bcc or the kernel headers are unusable, or the C does not compile.
            DatapathError: no bpffs, or the kernel refused the program.
        """
        pin_dir = Path(pin_dir)
        ensure_bpffs(pin_dir, bpffs)
        pinned.check_layout(pin_dir)  # before bcc would silently reuse a mismatched map
        program = _Program.compile(source, options, pin_dir)
        try:
            maps_ = pinned.PinnedMaps.open(pin_dir)
        except Exception:
            program.close()
            raise
        if maps_.layout_version() == 0:
            maps_.stamp_layout()
        return cls(maps_, options, metrics or DatapathMetrics(), source=source, program=program)

    @classmethod
    def open(cls, pin_dir: str | Path = pinned.DEFAULT_PIN_DIR, options: Options = Options(),
             *, bpffs: Path = DEFAULT_BPFFS, metrics: DatapathMetrics | None = None,
             source: Path = SOURCE, worker: int = 0) -> EgressDatapath | None:
        """Reuse the maps pinned in ``pin_dir`` without compiling; None unless all are pinned.

        The result has no program until ``load_program()``; until then the program attached
        by an earlier process (if any) enforces from these maps. ``worker``: the DNS worker
        whose exact allow map this instance writes (a worker process never loads the program).

        Raises:
            LayoutMismatch: the pins have another layout; the message says how to migrate.
            DatapathError: no bpffs.
        """
        pin_dir = Path(pin_dir)
        ensure_bpffs(pin_dir, bpffs)
        if not all((pin_dir / name).exists() for name in maps.PINNED_MAPS):
            return None  # a first start (or pins half made): load() lets bcc create them
        maps_ = pinned.PinnedMaps.open(pin_dir, worker)  # checks the layout
        if maps_.layout_version() == 0:
            maps_.stamp_layout()
        return cls(maps_, options, metrics or DatapathMetrics(), source=source)

    @property
    def program_loaded(self) -> bool:
        """Whether this instance has its program (``load``, or ``load_program`` done)."""
        return self._program is not None

    def load_program(self) -> list[str | int]:
        """Compile and load the program, then attach it, replacing whatever program of ours is
        there, to every interface ``attach()`` was asked for; return those attached.

        Blocking for seconds (clang): call it from a thread. An interface that has gone away
        meanwhile is skipped (nothing can arrive on it).

        Raises:
            ToolchainError, DatapathError: as ``load``; also when loaded already, or closed
                while compiling (the compiled program is then released).
            AttachError: the kernel refused to attach it to an interface that exists.
        """
        with self._lock:
            if self._program is not None or self._closed or self._cancelled:
                raise DatapathError("the program is loaded already, or the datapath is closed")
        program = _Program.compile(self._source, self.options, self.maps.pin_dir)
        with self._lock:
            if self._closed or self._cancelled:
                program.close()
                raise DatapathError("the datapath was closed, or its load cancelled, while its "
                                    "program compiled")
            self._program = program
            attached = []
            for interface, netns in self._wanted:
                try:
                    tc.attach(program.fd, PROGRAM, interface, netns)
                except tc.NoInterface:
                    continue
                attached.append(interface)
        return attached

    def cancel_load(self) -> None:
        """Make a ``load_program()`` under way (or to come) attach nothing: another process's
        program takes over (a handover). What it compiles is released; maps stay usable."""
        with self._lock:
            self._cancelled = True

    @property
    def prog_fd(self) -> int:
        """The loaded program's fd (BPF_PROG_TEST_RUN, tc).

        Raises:
            DatapathError: the program is not loaded yet.
        """
        program = self._program
        if program is None:
            raise DatapathError("the program is not loaded yet (open() without load_program())")
        return program.fd

    def close(self) -> None:
        """Release this process's handles; pins and attached filters stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.maps.close()
            if self._program is not None:
                self._program.close()

    def __enter__(self) -> EgressDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attachment -----------------------------------------------------------------------------

    def attach(self, interface: str | int, netns: str | None = None) -> int:
        """Gate ``interface``'s ingress (an endpoint's egress); replaces our earlier program.

        Idempotent; returns the interface index. Without the program yet, remembers the
        interface for ``load_program()`` and returns 0.

        Raises:
            AttachError: no such interface, or the kernel refused.
        """
        with self._lock:
            self._wanted[(interface, netns)] = None
            if self._program is None:
                return 0
            return tc.attach(self._program.fd, PROGRAM, interface, netns)

    def detach(self, interface: str | int, netns: str | None = None) -> bool:
        """Remove our filter from ``interface``; idempotent, other filters stay."""
        with self._lock:
            self._wanted.pop((interface, netns), None)
            return tc.detach(interface, netns)

    # --- maps (see pinned.PinnedMaps) -----------------------------------------------------------

    def set_endpoint(self, ip: str | Address, endpoint_id: int, flags: int, ifindex: int = 0) -> None:
        """See ``PinnedMaps.set_endpoint``."""
        self.maps.set_endpoint(ip, endpoint_id, flags, ifindex)

    def remove_endpoint(self, ip: str | Address) -> bool:
        """See ``PinnedMaps.remove_endpoint``."""
        return self.maps.remove_endpoint(ip)

    def set_dns_target(self, ip: str | Address, port: int = 53) -> None:
        """See ``PinnedMaps.set_dns_target``."""
        self.maps.set_dns_target(ip, port)

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        """See ``PinnedMaps.upsert_allows``."""
        self.maps.upsert_allows(entries)

    def upsert_hosts(self, batch: HostAllows) -> None:
        """See ``PinnedMaps.upsert_hosts``."""
        self.maps.upsert_hosts(batch)

    def delete_allows(self, keys: Sequence[AllowKey]) -> int:
        """See ``PinnedMaps.delete_allows``."""
        return self.maps.delete_allows(keys)

    def lookup(self, key: AllowKey) -> AllowEntry | None:
        """See ``PinnedMaps.lookup``."""
        return self.maps.lookup(key)

    def dump(self) -> list[AllowEntry]:
        """See ``PinnedMaps.dump``."""
        return self.maps.dump()

    def counters(self) -> dict[int, dict[maps.Reason, int]]:
        """See ``PinnedMaps.counters``."""
        return self.maps.counters()

    def gc(self, now_ns: int, batch: int = pinned.BATCH) -> int:
        """Delete up to ``batch`` expired entries (blocking: run it in a thread); count them."""
        started = time.monotonic()
        deleted = self.maps.gc(now_ns, batch)
        self.metrics.gc_deleted.inc(deleted)
        self.metrics.gc_seconds.observe(time.monotonic() - started)
        return deleted

    def drop_events(self, sink: Callable[[DropEvent], None] | None = None) -> DropEventReader:
        """The reader of this program's drop events (one per instance).

        Raises:
            DatapathError: the program is not loaded yet (the ring buffer is the program's).
        """
        if self._program is None:
            raise DatapathError("the program is not loaded yet: no drop events to read")
        if self._reader is None:
            self._reader = DropEventReader(self._program.bpf, sink)
        return self._reader
