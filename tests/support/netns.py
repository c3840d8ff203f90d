"""Network-namespace helpers for root tests: a uniquely named namespace pair joined by a veth.

Nothing is created in the root namespace: both namespaces are new, the veth is made inside the
first one with its peer placed straight into the second, and deleting the namespaces deletes the
veth (and any qdisc or filter on it). Teardown always runs, even when setup fails half way.

    with netns.veth_pair() as pair:
        netns.run(pair.a.ns, "python3", "-c", "...")   # traffic from a to pair.b.ip
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import NetNS
from pyroute2 import netns as pr_netns

NETNS_DIR = "/run/netns"
PREFIX = "fqpt-"


@dataclass(frozen=True)
class Side:
    """One end of the pair: its namespace, interface and addresses."""

    ns: str
    ifname: str
    ip: str
    ip6: str


@dataclass(frozen=True)
class VethPair:
    """Two namespaces joined by a veth, on 192.0.2.0/24 and 2001:db8:f0::/64."""

    a: Side
    b: Side
    prefixlen: int = 24
    prefixlen6: int = 64


def unique_name(prefix: str = PREFIX) -> str:
    """Return a namespace name that no other test run will pick (``fqpt-<8 hex>``)."""
    return f"{prefix}{secrets.token_hex(4)}"


def exists(name: str) -> bool:
    """Report whether a named network namespace exists."""
    return os.path.exists(os.path.join(NETNS_DIR, name))


@contextlib.contextmanager
def namespace(name: str | None = None) -> Iterator[str]:
    """Create a named network namespace with ``lo`` up; delete it on exit."""
    name = name or unique_name()
    pr_netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        remove(name)


def remove(name: str) -> None:
    """Delete a named namespace if it exists (and with it every interface inside)."""
    if exists(name):
        pr_netns.remove(name)


@contextlib.contextmanager
def veth_pair(
    ip_a: str = "192.0.2.1",
    ip_b: str = "192.0.2.2",
    ip6_a: str = "2001:db8:f0::1",
    ip6_b: str = "2001:db8:f0::2",
) -> Iterator[VethPair]:
    """Create namespaces a and b joined by a veth (``veth-a`` in a, ``veth-b`` in b), both up.

    IPv6 addresses are added with ``nodad`` so they are usable at once.
    """
    with namespace() as ns_a, namespace() as ns_b:
        pair = VethPair(
            a=Side(ns=ns_a, ifname="veth-a", ip=ip_a, ip6=ip6_a),
            b=Side(ns=ns_b, ifname="veth-b", ip=ip_b, ip6=ip6_b),
        )
        with NetNS(ns_a) as ns:
            ns.link(
                "add",
                ifname=pair.a.ifname,
                kind="veth",
                peer={"ifname": pair.b.ifname, "net_ns_fd": ns_b},
            )
        for side in (pair.a, pair.b):
            _configure(side, pair)
        yield pair


def _configure(side: Side, pair: VethPair) -> None:
    # IFA_F_NODAD (0x02): skip duplicate address detection so the v6 address works at once.
    with NetNS(side.ns) as ns:
        index = ns.link_lookup(ifname=side.ifname)[0]
        ns.addr("add", index=index, address=side.ip, prefixlen=pair.prefixlen)
        ns.addr("add", index=index, address=side.ip6, prefixlen=pair.prefixlen6, flags=0x02)
        ns.link("set", index=index, state="up")


def run(ns: str, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``ns`` (``ip netns exec``), capturing its output."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )
