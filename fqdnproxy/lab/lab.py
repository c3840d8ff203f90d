"""``fqdnproxy lab up|down|status``: the whole product in network namespaces on one machine.

``up`` builds the topology (topology.py) from an endpoint inventory, mounts a private bpffs under
the state directory, starts knot (the world's real DNS server, demo zone) and the echo servers in
the world, and the agent in the node with the datapath on, then records what it made in
``STATE_DIR/lab.json``. ``down`` removes everything, even after a crash or with no record left:
processes in the recorded pids and in any ``fqp-`` namespace, the bpffs, the namespaces, the
pods' resolv.conf and the state directory; a second ``down`` finds nothing and succeeds.
Nothing is created in the caller's network namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fqdnproxy import config as config_mod
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.lab import knot, netns, processes, topology

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
STATE_DIR = Path("/run/fqdnproxy-lab")
STATE_FILE = "lab.json"
LOCK = Path("/run/fqdnproxy-lab.lock")
METRICS = "127.0.0.1:9153"  # in the node namespace
DNS_PORT = 53


class LabError(FqdnproxyError):
    """The lab could not be built, or is not there."""


def transparent_available() -> bool:
    """Whether this agent has transparent redirection (``dns.mode``)."""
    return any(f.name == "mode" for f in dataclasses.fields(config_mod.DnsConfig))


@dataclass(frozen=True)
class LabSettings:
    """What ``lab up`` builds."""

    inventory: Path = POLICIES / "endpoints.demo.yaml"
    policies: Path = POLICIES / "demo.yaml"
    zones: tuple[Path, ...] = (knot.DEMO_ZONE,)
    state_dir: Path = STATE_DIR
    dns_mode: str = field(
        default_factory=lambda: "transparent" if transparent_available() else "explicit")
    min_ttl: int = 2  # seconds: short.demo.test (TTL 2) expires within the demo
    start_timeout: float = 180.0  # the agent compiles its BPF program at start
    log_level: str = "info"


@dataclass(frozen=True)
class Lab:
    """A lab that is up, as recorded in its state directory."""

    state_dir: Path
    dns_mode: str
    plan: topology.Plan
    pids: dict[str, int]  # "agent", "knot", "servers" -> pid
    inventory: Path
    policies: Path

    @property
    def bpffs(self) -> Path:
        return self.state_dir / "bpffs"

    @property
    def pin_dir(self) -> Path:
        return self.bpffs / "fqdnproxy"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def agent_log(self) -> Path:
        return self.state_dir / "agent.log"

    def to_json(self) -> dict[str, object]:
        return {"dns_mode": self.dns_mode, "pids": self.pids, "inventory": str(self.inventory),
                "policies": str(self.policies), "plan": dataclasses.asdict(self.plan)}

    @classmethod
    def load(cls, state_dir: Path = STATE_DIR) -> Lab:
        """The lab recorded in ``state_dir``.

        Raises:
            LabError: no lab is recorded there (or the record is unreadable).
        """
        try:
            raw = json.loads((state_dir / STATE_FILE).read_text())
            plan = raw["plan"]
            pods = tuple(topology.Pod(p["name"], p["namespace"], p["host_if"], tuple(p["ips"]),
                                      p["endpoint_id"], tuple(map(tuple, p["labels"])))
                         for p in plan["pods"])
            return cls(state_dir, raw["dns_mode"],
                       topology.Plan(pods, tuple(plan["dns_servers"]), tuple(plan["world_ips"])),
                       {k: int(v) for k, v in raw["pids"].items()}, Path(raw["inventory"]),
                       Path(raw["policies"]))
        except FileNotFoundError:
            raise LabError(f"no lab is up (nothing recorded in {state_dir})") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise LabError(f"{state_dir / STATE_FILE}: unreadable ({error}); "
                           "`fqdnproxy lab down` removes what is left") from None


@contextlib.contextmanager
def exclusive(timeout: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide lab lock while building, using and removing a lab.

    The lab's names are fixed (fqp-node, ...), so two users at once would tear down each
    other's lab; the demo and the tests take turns here. Not re-entrant.

    Raises:
        LabError: the lock was not free within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with open(LOCK, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab user holds {LOCK} (demo or tests running?)"
                                   ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- up ------------------------------------------------------------------------------------------


def up(settings: LabSettings = LabSettings(), say=print) -> Lab:  # type: ignore[no-untyped-def]
    """Build the lab and start its servers and the agent; ``say`` narrates each stage.

    Raises:
        LabError: a lab or its leftovers exist, or something failed (what was made is removed).
    """
    leftovers = netns.names(topology.PREFIX)
    if leftovers or settings.state_dir.exists():
        raise LabError(f"a lab is up or left over ({', '.join(leftovers) or settings.state_dir}); "
                       "run `fqdnproxy lab down` first")
    if settings.dns_mode == "transparent" and not transparent_available():
        raise LabError("this agent has no transparent mode yet; use --dns-mode explicit")
    plan = topology.plan(settings.inventory, list(settings.zones))
    state_dir = settings.state_dir
    state_dir.mkdir(mode=0o700, parents=True)
    pids: dict[str, int] = {}
    lab = Lab(state_dir, settings.dns_mode, plan, pids, settings.inventory.resolve(),
              settings.policies.resolve())
    try:
        _record(lab)  # from here on, `down` knows the lab even if this process dies
        say(f"namespaces: {', '.join(plan.namespaces)}")
        topology.build(plan, node_serves_dns=settings.dns_mode == "explicit")
        lab.bpffs.mkdir()
        _mount_bpffs(lab.bpffs)
        server = _knot(lab, settings.zones)
        say(f"world: knot serving {', '.join(server.zone_names)} on "
            f"{', '.join(plan.dns_servers)}; echo servers on {len(plan.world_ips)} addresses")
        server.start()
        pids["knot"] = server.pid or 0
        _record(lab)
        pids["servers"] = processes.spawn(
            topology.WORLD, [sys.executable, "-m", "fqdnproxy.lab.servers", *plan.world_ips],
            state_dir / "servers.log", "ready", timeout=30)
        _record(lab)
        say(f"node: fqdnproxy ({settings.dns_mode} mode, datapath on, "
            f"{settings.policies.name}); compiling the BPF program ...")
        pids["agent"] = processes.spawn(
            topology.NODE, [sys.executable, "-m", "fqdnproxy", "run", *agent_args(lab, settings)],
            lab.agent_log, "forwarding to", timeout=settings.start_timeout, env=_agent_env())
        _record(lab)
    except BaseException:
        down(state_dir, say=lambda _text: None)
        raise
    return lab


def agent_args(lab: Lab, settings: LabSettings) -> list[str]:
    """The agent's flags for this lab."""
    plan = lab.plan
    world_dns = [_address(ip, DNS_PORT) for ip, _ in topology.WORLD_TRANSIT]
    args = [
        "--upstream-servers", ",".join(world_dns),
        "--policy-directory", str(lab.policies),
        "--policy-endpoints", str(lab.inventory),
        "--policy-reload-interval", "1",
        "--datapath-enabled", "true",
        "--datapath-pin-dir", str(lab.pin_dir),
        "--state-directory", str(lab.state_dir / "agent"),
        "--state-admin-socket", str(lab.admin_socket),
        "--audit-path", str(lab.audit_path),
        "--metrics-listen", METRICS,
        "--cache-min-ttl", str(settings.min_ttl),
        "--log-level", settings.log_level,
    ]
    if lab.dns_mode == "explicit":
        # The node holds kube-dns's addresses: pods reach the proxy where they always ask.
        args += ["--dns-listen", ",".join(_address(ip, DNS_PORT) for ip in plan.dns_servers)]
    else:
        args += ["--dns-mode", "transparent", "--dns-listen", "127.0.0.1:5353,[::1]:5353"]
    return args


def _knot(lab: Lab, zones: tuple[Path, ...]) -> knot.KnotServer:
    listen = [(ip, DNS_PORT) for ip in lab.plan.dns_servers]
    listen += [(ip, DNS_PORT) for ip, _ in topology.WORLD_TRANSIT]
    return knot.KnotServer(listen=listen, zones=zones, rundir=lab.state_dir / "knot",
                           netns=topology.WORLD, workers=1)


def _agent_env() -> dict[str, str]:
    """BCC_KERNEL_SOURCE from the bootstrap's env file when the caller's environment lacks it."""
    env: dict[str, str] = {}
    path = Path(sys.prefix) / "fqdnproxy.env"
    if "BCC_KERNEL_SOURCE" not in os.environ and path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                env[key.strip()] = value.strip()
    return env


def _record(lab: Lab) -> None:
    path = lab.state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lab.to_json(), indent=2) + "\n")
    tmp.replace(path)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- down ----------------------------------------------------------------------------------------


def down(state_dir: Path = STATE_DIR, say=print) -> list[str]:  # type: ignore[no-untyped-def]
    """Remove every part of the lab that exists; what was removed (empty: nothing was there).

    Works from the record when there is one, and from the ``fqp-`` names when there is not.
    The agent is stopped first with SIGTERM, so it stops cleanly.
    """
    removed: list[str] = []
    pids: dict[str, int] = {}
    try:
        pids = json.loads((state_dir / STATE_FILE).read_text()).get("pids", {})
    except (OSError, ValueError, AttributeError):
        pass
    for role in ("agent", "servers", "knot"):
        pid = int(pids.get(role, 0) or 0)
        if pid and _is_lab_process(pid, role) and netns.terminate(pid, timeout=10.0):
            removed.append(f"process {role} ({pid})")
    names = netns.names(topology.PREFIX)
    for name in names:
        for pid in netns.pids(name):
            if pid != os.getpid() and netns.terminate(pid):
                removed.append(f"process {pid} in {name}")
    while _is_mounted(state_dir / "bpffs"):
        from fqdnproxy.datapath import bpfsys

        bpfsys.umount(state_dir / "bpffs")
        removed.append(f"bpffs {state_dir / 'bpffs'}")
    for name in names:
        if netns.remove(name):
            removed.append(f"namespace {name}")
    removed += [f"resolv.conf {path}" for path in topology.remove_resolv_confs()]
    if state_dir.exists():
        shutil.rmtree(state_dir)
        removed.append(f"state {state_dir}")
    for line in removed:
        say(f"removed {line}")
    return removed


_MARKERS = {"agent": "fqdnproxy run", "servers": "fqdnproxy.lab.servers", "knot": "knotd"}


def _is_lab_process(pid: int, role: str) -> bool:
    """The recorded pid still runs what the lab started (not a recycled pid)."""
    return _MARKERS[role] in processes.command_line(pid)


def _mount_bpffs(path: Path) -> None:
    from fqdnproxy.datapath import bpfsys

    try:
        bpfsys.mount_bpffs(path)
    except bpfsys.BpfError as error:
        raise LabError(f"cannot mount a bpf filesystem on {path}: {error}") from None


def _is_mounted(path: Path) -> bool:
    target = str(path)
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    return any(line.split()[4] == target for line in mountinfo.splitlines())


# --- status --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What exists of the lab now."""

    up: bool  # recorded, and every recorded process, namespace and the bpffs are there
    lines: tuple[str, ...]


def status(state_dir: Path = STATE_DIR) -> Status:
    """Report what of the lab exists (recorded or left over)."""
    names = netns.names(topology.PREFIX)
    try:
        lab = Lab.load(state_dir)
    except LabError as error:
        if not names:
            return Status(False, ("lab: down (nothing found)",))
        return Status(False, (f"lab: not up ({error})",
                              f"left over: {', '.join(names)}; `fqdnproxy lab down` removes it"))
    lines = []
    healthy = True
    for role, pid in sorted(lab.pids.items()):
        running = _is_lab_process(pid, role)
        healthy &= running
        lines.append(f"  process {role:<8} {pid:>7}  {'running' if running else 'NOT RUNNING'}")
    for role in ("knot", "servers", "agent"):
        if role not in lab.pids:
            healthy = False
            lines.append(f"  process {role:<8}       -  not started")
    for name in lab.plan.namespaces:
        there = name in names
        healthy &= there
        lines.append(f"  namespace {name:<14} {'present' if there else 'MISSING'}")
    mounted = _is_mounted(lab.bpffs)
    healthy &= mounted
    lines.append(f"  bpffs {lab.bpffs}  {'mounted' if mounted else 'NOT MOUNTED'}")
    for pod in lab.plan.pods:
        lines.append(f"  pod {pod.name:<10} {', '.join(pod.ips):<34} netns {pod.namespace}, "
                     f"veth {pod.host_if}, endpoint {pod.endpoint_id}")
    lines += [f"  kube-dns       {', '.join(lab.plan.dns_servers)} (knot in {topology.WORLD})",
              f"  policies       {lab.policies}",
              f"  inventory      {lab.inventory}",
              f"  audit log      {lab.audit_path}",
              f"  agent log      {lab.agent_log}",
              f"  admin socket   {lab.admin_socket}",
              f"  metrics        http://{METRICS}/metrics in {topology.NODE}"]
    head = (f"lab: {'up' if healthy else 'DEGRADED'} (dns mode {lab.dns_mode}), "
            f"state in {state_dir}")
    extra = sorted(set(names) - set(lab.plan.namespaces))
    if extra:
        lines.append(f"  unrecorded namespaces: {', '.join(extra)}")
    return Status(healthy, (head, *lines))
