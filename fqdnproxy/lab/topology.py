"""The lab's network: a node, one namespace per pod of an inventory, and a world.

    fqp-frontend  eth0 198.51.100.10/32      ─┐ fqp-frontend-h        fqp-world-h 192.0.2.253/30
                  2001:db8:100::10/128        │ 192.0.2.1/32            2001:db8:ffff::1/64
    fqp-backend   eth0 198.51.100.11/32      ─┤ fqp-backend-h  fqp-node ────────────── eth0 fqp-world
                  2001:db8:100::11/128        │ 2001:db8:1::1/128  (forwards)   192.0.2.254/30
                   (addresses: the inventory)                                   2001:db8:ffff::2/64
                                                                                + every address of
    pods: default via 192.0.2.1 / 2001:db8:1::1 (the node, on every pod link)     the demo zone, the
    node: each pod's /32 and /128 on its veth; default via the world               DNS servers, and
    world: default via the node                                                    UNRESOLVED_*

Every address is from the documentation ranges (RFC 5737, RFC 3849). The pods' addresses, labels
and host-side interfaces come from the endpoint inventory, and its ``kind: service`` endpoints
(kube-dns) are the world's DNS servers: the addresses written to the pods' resolv.conf
(/etc/netns/fqp-POD/resolv.conf, which ``ip netns exec`` shows the pod as /etc/resolv.conf).
Nothing is created in the caller's network namespace; the namespaces are made first and every
veth is made inside the node with its peer placed straight into the other namespace.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import NetNS

from fqdnproxy import endpoints
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.lab import netns

PREFIX = "fqp-"
NODE = "fqp-node"
WORLD = "fqp-world"
WORLD_LINK = "fqp-world-h"  # the node's side of the link to the world ("eth0" in the world)
POD_IF = "eth0"
GATEWAY = ("192.0.2.1", "2001:db8:1::1")  # the node's address on every pod link
NODE_TRANSIT = (("192.0.2.253", 30), ("2001:db8:ffff::1", 64))
WORLD_TRANSIT = (("192.0.2.254", 30), ("2001:db8:ffff::2", 64))
UNRESOLVED = ("203.0.113.99", "2001:db8::99")  # served by the world, returned by no name
RESOLV_DIR = Path("/etc/netns")

_IFNAMSIZ = 15
_ADDRESS_RECORD = re.compile(r"^\S*\s+(?:\d+\s+)?IN\s+(A|AAAA)\s+(\S+)", re.MULTILINE)


class TopologyError(FqdnproxyError):
    """The inventory cannot be laid out as a lab."""


@dataclass(frozen=True)
class Pod:
    """One workload of the inventory, as the lab builds it."""

    name: str
    namespace: str  # the network namespace, fqp-<name>
    host_if: str  # its veth's side in the node
    ips: tuple[str, ...]
    endpoint_id: int
    labels: tuple[tuple[str, str], ...]

    def ip(self, family: int) -> str:
        """The pod's first address of ``family`` (4 or 6).

        Raises:
            TopologyError: the inventory gives it none.
        """
        for ip in self.ips:
            if ipaddress.ip_address(ip).version == family:
                return ip
        raise TopologyError(f"pod {self.name} has no IPv{family} address in the inventory")


@dataclass(frozen=True)
class Plan:
    """What the lab builds: pods, DNS servers and the addresses the world serves."""

    pods: tuple[Pod, ...]
    dns_servers: tuple[str, ...]  # the inventory's services (kube-dns), served by the world
    world_ips: tuple[str, ...]  # the zone's addresses and UNRESOLVED: echo servers listen here

    def pod(self, name: str) -> Pod:
        """The pod called ``name``.

        Raises:
            TopologyError: no such pod.
        """
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise TopologyError(f"no pod {name} in the lab (pods: "
                            f"{', '.join(p.name for p in self.pods)})")

    def dns_server(self, family: int) -> str:
        """The first DNS server address of ``family``.

        Raises:
            TopologyError: the inventory has none.
        """
        for ip in self.dns_servers:
            if ipaddress.ip_address(ip).version == family:
                return ip
        raise TopologyError(f"the inventory has no IPv{family} DNS service (kind: service)")

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (NODE, WORLD, *(pod.namespace for pod in self.pods))


def plan(inventory: Path, zones: list[Path]) -> Plan:
    """Lay out the lab for ``inventory``; the world serves every A/AAAA address in ``zones``.

    Raises:
        TopologyError: a pod's name or interface does not fit, or there is no DNS service.
        endpoints.EndpointsError: the inventory is invalid.
    """
    registry = endpoints.load_inventory(inventory)
    pods = []
    for endpoint in registry.workloads():
        namespace = f"{PREFIX}{endpoint.name}"
        host_if = endpoint.interface or f"{PREFIX}{endpoint.name}-h"
        if not host_if.startswith(PREFIX) or len(host_if) > _IFNAMSIZ:
            raise TopologyError(
                f"{inventory}: {endpoint.key}: interface {host_if!r} must start with {PREFIX!r} "
                f"and have at most {_IFNAMSIZ} characters (the lab creates it)")
        if namespace in (NODE, WORLD) or any(p.namespace == namespace for p in pods):
            raise TopologyError(f"{inventory}: {endpoint.key}: a second namespace {namespace}")
        pods.append(Pod(endpoint.name, namespace, host_if, endpoint.ips, endpoint.id,
                        tuple(sorted(endpoint.labels.items()))))
    dns = tuple(ip for e in registry if e.kind == "service" for ip in e.ips)
    if not dns:
        raise TopologyError(f"{inventory}: no kind: service endpoint (kube-dns) to serve DNS at")
    served: list[str] = []
    for path in zones:
        served += [ip for _, ip in _ADDRESS_RECORD.findall(path.read_text())]
    served += UNRESOLVED
    pod_ips = {ip for pod in pods for ip in pod.ips}
    world = tuple(dict.fromkeys(ip for ip in served if ip not in pod_ips and ip not in dns))
    return Plan(tuple(pods), dns, world)


def build(lab: Plan, node_serves_dns: bool) -> None:
    """Create the namespaces, links, addresses, routes and the pods' resolv.conf.

    ``node_serves_dns`` puts the DNS server addresses on the node's loopback (explicit mode: the
    agent listens on them, so pods reach the proxy at the address they always use); otherwise
    they are the world's and transparent redirection hands pods' queries to the proxy.

    Raises:
        netns.NetnsError: a namespace of this plan exists already.
    """
    for name in lab.namespaces:
        netns.create(name)
    netns.run(NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    for pod in lab.pods:
        _veth(NODE, pod.host_if, pod.namespace)
        with NetNS(NODE) as ns:
            index = ns.link_lookup(ifname=pod.host_if)[0]
            for gateway in GATEWAY:
                _addr(ns, index, gateway, _host_len(gateway))
            ns.link("set", index=index, state="up")
            for ip in pod.ips:
                ns.route("add", dst=f"{ip}/{_host_len(ip)}", oif=index, family=_family(ip))
        with NetNS(pod.namespace) as ns:
            index = ns.link_lookup(ifname=POD_IF)[0]
            for ip in pod.ips:
                _addr(ns, index, ip, _host_len(ip))
            ns.link("set", index=index, state="up")
            for gateway in GATEWAY:
                family = _family(gateway)
                ns.route("add", dst=f"{gateway}/{_host_len(gateway)}", oif=index, scope=253,
                         family=family)
                ns.route("add", dst="0.0.0.0/0" if family == 2 else "::/0", gateway=gateway,
                         family=family)
        _write_resolv_conf(pod.namespace, lab.dns_servers)
    _veth(NODE, WORLD_LINK, WORLD)
    with NetNS(NODE) as ns:
        index = ns.link_lookup(ifname=WORLD_LINK)[0]
        for ip, length in NODE_TRANSIT:
            _addr(ns, index, ip, length)
        ns.link("set", index=index, state="up")
        for ip, _ in WORLD_TRANSIT:
            ns.route("add", dst="0.0.0.0/0" if _family(ip) == 2 else "::/0", gateway=ip,
                     family=_family(ip))
        if node_serves_dns:
            lo = ns.link_lookup(ifname="lo")[0]
            for ip in lab.dns_servers:
                _addr(ns, lo, ip, _host_len(ip))
    with NetNS(WORLD) as ns:
        index = ns.link_lookup(ifname=POD_IF)[0]
        for ip, length in WORLD_TRANSIT:
            _addr(ns, index, ip, length)
        for ip in (*lab.dns_servers, *lab.world_ips):
            _addr(ns, index, ip, _host_len(ip))
        ns.link("set", index=index, state="up")
        for ip, _ in NODE_TRANSIT:
            ns.route("add", dst="0.0.0.0/0" if _family(ip) == 2 else "::/0", gateway=ip,
                     family=_family(ip))


def remove_resolv_confs(prefix: str = PREFIX) -> list[str]:
    """Delete /etc/netns/<prefix>* (the pods' resolv.conf); the names removed."""
    removed = []
    if RESOLV_DIR.is_dir():
        for path in sorted(RESOLV_DIR.glob(f"{prefix}*")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _write_resolv_conf(namespace: str, servers: tuple[str, ...]) -> None:
    directory = RESOLV_DIR / namespace
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"# fqdnproxy lab: {namespace} asks kube-dns, as a pod would"]
    lines += [f"nameserver {ip}" for ip in servers]
    (directory / "resolv.conf").write_text("\n".join(lines) + "\n")


def _veth(namespace: str, ifname: str, peer_namespace: str) -> None:
    """A veth made inside ``namespace`` with its peer (POD_IF) put straight into the other."""
    with NetNS(namespace) as ns:
        ns.link("add", ifname=ifname, kind="veth",
                peer={"ifname": POD_IF, "net_ns_fd": peer_namespace})


def _addr(ns: NetNS, index: int, ip: str, length: int) -> None:
    flags = 0x02 if _family(ip) == 10 else 0  # IFA_F_NODAD: usable at once
    ns.addr("add", index=index, address=ip, prefixlen=length, flags=flags)


def _family(ip: str) -> int:
    return 10 if ":" in ip else 2


def _host_len(ip: str) -> int:
    return 128 if ":" in ip else 32
