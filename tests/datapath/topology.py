"""A node with two pods and a world, all in namespaces the test creates (nothing in the root one).

    pod1 (eth0 192.0.2.10/28, 2001:db8:1::10)  --  lxc1 \
                                                          node (forwards) -- wan0 == eth0 world
    pod2 (eth0 192.0.2.20/28, 2001:db8:2::20)  --  lxc2 /
    world: 203.0.113.1-.10/24, 198.51.100.7/24, 2001:db8:ff::1-3/64; echo servers on PORTS

The program attaches to lxc1 and lxc2 (clsact ingress) in the node namespace.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import NetNS

from tests.datapath import leftovers
from tests.support import netns

PEER = str(Path(__file__).with_name("peer.py"))
PORTS = (53, 8080, 8081, 9000)
WORLD_V4 = [f"203.0.113.{i}" for i in range(1, 11)] + ["198.51.100.7"]
WORLD_V6 = ["2001:db8:ff::1", "2001:db8:ff::2", "2001:db8:ff::3"]


@dataclass(frozen=True)
class Pod:
    ns: str
    host_if: str
    ip: str
    ip6: str


@dataclass(frozen=True)
class Topology:
    node: str
    world: str
    pod1: Pod
    pod2: Pod

    def probe(self, pod: Pod, *specs: str) -> list[bool]:
        """Run probes (``tcp,ADDR,PORT``) from ``pod``; one bool per spec."""
        import json

        out = netns.run(pod.ns, sys.executable, PEER, "probe", *specs, timeout=60)
        return json.loads(out.stdout)

    def ifindex(self, pod: Pod) -> int:
        with NetNS(self.node) as ns:
            return int(ns.link_lookup(ifname=pod.host_if)[0])


def _addr(ns: NetNS, ifname: str, address: str, prefixlen: int) -> None:
    index = ns.link_lookup(ifname=ifname)[0]
    flags = 0x02 if ":" in address else 0  # IFA_F_NODAD
    ns.addr("add", index=index, address=address, prefixlen=prefixlen, flags=flags)


def _link(a: str, a_if: str, b: str, b_if: str) -> None:
    with NetNS(a) as ns:
        ns.link("add", ifname=a_if, kind="veth", peer={"ifname": b_if, "net_ns_fd": b})


def _up(name: str, ifname: str) -> None:
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")


@contextlib.contextmanager
def _namespace() -> Iterator[str]:
    """``netns.namespace()``, recorded in the ledger so that a killed run's is swept next time."""
    name = netns.unique_name()
    leftovers.record("netns", name)
    try:
        with netns.namespace(name) as made:
            yield made
    finally:
        leftovers.strike("netns", name)


@contextlib.contextmanager
def topology(ports: tuple[int, ...] = PORTS) -> Iterator[Topology]:
    """Build the namespaces, addresses, routes and world servers (echo servers on ``ports``);
    tear all down on exit."""
    with _namespace() as node, _namespace() as world, _namespace() as p1, _namespace() as p2:
        pods = (Pod(p1, "lxc1", "192.0.2.10", "2001:db8:1::10"),
                Pod(p2, "lxc2", "192.0.2.20", "2001:db8:2::20"))
        for i, pod in enumerate(pods, start=1):
            _link(node, pod.host_if, pod.ns, "eth0")
            gw4, gw6 = f"192.0.2.{16 * (i - 1) + 1}", f"2001:db8:{i}::1"
            with NetNS(node) as ns:
                _addr(ns, pod.host_if, gw4, 28)
                _addr(ns, pod.host_if, gw6, 64)
            with NetNS(pod.ns) as ns:
                _addr(ns, "eth0", pod.ip, 28)
                _addr(ns, "eth0", pod.ip6, 64)
            _up(node, pod.host_if)
            _up(pod.ns, "eth0")
            with NetNS(pod.ns) as ns:
                ns.route("add", dst="0.0.0.0/0", gateway=gw4)
                ns.route("add", dst="::/0", gateway=gw6, family=10)
        _link(node, "wan0", world, "eth0")
        with NetNS(node) as ns:
            _addr(ns, "wan0", "203.0.113.254", 24)
            _addr(ns, "wan0", "198.51.100.254", 24)
            _addr(ns, "wan0", "2001:db8:ff::fe", 64)
        with NetNS(world) as ns:
            for a in WORLD_V4:
                _addr(ns, "eth0", a, 24)
            for a in WORLD_V6:
                _addr(ns, "eth0", a, 64)
        _up(node, "wan0")
        _up(world, "eth0")
        with NetNS(world) as ns:
            ns.route("add", dst="192.0.2.0/24", gateway="203.0.113.254")
            ns.route("add", dst="2001:db8::/44", gateway="2001:db8:ff::fe", family=10)
        netns.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        server = subprocess.Popen(
            ["ip", "netns", "exec", world, sys.executable, PEER, "serve", *map(str, ports)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield Topology(node, world, *pods)
        finally:
            server.kill()
            server.wait()
