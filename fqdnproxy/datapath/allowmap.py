"""Allow entries and the writer the proxy consumes: ``AllowMapWriter`` and its in-memory form.

The proxy learns (endpoint, IP, ports, expiry) from DNS answers and writes them through an
``AllowMapWriter``. In production that is ``egress.EgressDatapath`` (the kernel maps); the
proxy's loopback tests use ``InMemoryAllowMap``, which applies the same matching rule as the
kernel (exact entry first, then the longest covering prefix) so tests can ask what would pass.
Neither this module nor its callers need bcc.

Expiry is in kernel monotonic nanoseconds (``kernel_now_ns()``), the clock bpf_ktime_get_ns()
reads; 0 means static (CIDR and endpoint rules never expire).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy import ipkey  # the learn stage's integer keys (pure: no I/O)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_PORT_RANGES = 8  # FQDN_MAX_PORT_RANGES in bpf/fqdn_egress.c
PROTOCOLS = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


class AllowEntryError(FqdnproxyError, ValueError):
    """An allow entry the datapath cannot hold."""


def host_network(version: int, address: int) -> Network:
    """The /32 (``version`` 4) or /128 (6) of the address whose integer value is ``address``.

    Equal in every way to ``ipaddress.ip_network(address)``, at a fraction of its cost: the
    learn stage builds one per new IP, and IPv4Network.__init__ spends about a microsecond
    splitting and checking a prefix that a host's address cannot get wrong.
    """
    return host4_network(address) if version == 4 else host6_network(address)


def _host4_fast(address: int) -> ipaddress.IPv4Network:
    """``host_network(4, address)``: ``address`` is an int in [0, 2**32), unchecked."""
    ip = _new(_V4_ADDRESS)
    _set_v4_ip(ip, address)
    network = _new(_V4_NETWORK)
    # What IPv4Network.__init__ leaves in the instance dict for a host prefix, hosts included.
    network.__dict__ = {"network_address": ip, "netmask": _V4_HOST_MASK, "_prefixlen": 32,
                        "hosts": lambda: [_V4_ADDRESS(address)]}
    return network


def _host6_fast(address: int) -> ipaddress.IPv6Network:
    """``host_network(6, address)``: ``address`` is an int in [0, 2**128), unchecked."""
    ip = _new(_V6_ADDRESS)
    _set_v6_ip(ip, address)
    _set_v6_scope(ip, None)
    network = _new(_V6_NETWORK)
    network.__dict__ = {"network_address": ip, "netmask": _V6_HOST_MASK, "_prefixlen": 128,
                        "hosts": lambda: [_V6_ADDRESS(address)]}
    return network


def _host4_slow(address: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(address)


def _host6_slow(address: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(address)


def _fast_hosts_match() -> bool:
    """Whether the shortcuts build what ipaddress's constructors build (checked at import)."""
    for fast, real_cls, address_cls, sample in (
            (_host4_fast, ipaddress.IPv4Network, ipaddress.IPv4Address, 0xC0000207),
            (_host6_fast, ipaddress.IPv6Network, ipaddress.IPv6Address, 0x20010DB8 << 96 | 7)):
        made = fast(sample)
        real = real_cls(sample)
        made_ip, real_ip = made.network_address, real.network_address
        if (made != real or hash(made) != hash(real) or made.__dict__.keys() != real.__dict__.keys()
                or str(made) != str(real) or list(made.hosts()) != list(real.hosts())
                or made.prefixlen != real.prefixlen or made.netmask != real.netmask
                or made_ip != real_ip or hash(made_ip) != hash(real_ip)
                or type(made_ip) is not address_cls or str(made_ip) != str(real_ip)
                or made_ip.packed != real_ip.packed
                or getattr(made_ip, "__dict__", None) != getattr(real_ip, "__dict__", None)
                or any(getattr(made_ip, slot, None) != getattr(real_ip, slot, None)
                       for slot in address_cls.__slots__ if slot != "__weakref__")):
            return False
    return True


_new = object.__new__
_V4_ADDRESS, _V6_ADDRESS = ipaddress.IPv4Address, ipaddress.IPv6Address
_V4_NETWORK, _V6_NETWORK = ipaddress.IPv4Network, ipaddress.IPv6Network
host4_network = _host4_slow
host6_network = _host6_slow
try:
    _V4_HOST_MASK = ipaddress.IPv4Network("0.0.0.0/32").netmask
    _V6_HOST_MASK = ipaddress.IPv6Network("::/128").netmask
    _set_v4_ip = _V4_ADDRESS.__dict__["_ip"].__set__
    _set_v6_ip = _V6_ADDRESS.__dict__["_ip"].__set__
    _set_v6_scope = _V6_ADDRESS.__dict__["_scope_id"].__set__
    if _fast_hosts_match():
        host4_network, host6_network = _host4_fast, _host6_fast
except Exception:  # noqa: BLE001 - any surprise in ipaddress's internals means: do not use it
    host4_network, host6_network = _host4_slow, _host6_slow
_FAST_HOSTS = host4_network is _host4_fast


def kernel_now_ns() -> int:
    """Return the kernel's monotonic clock in ns: what bpf_ktime_get_ns() reads right now."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True, order=True)
class PortRange:
    """Destination ports ``first``..``last`` (inclusive) of ``protocol`` (IPPROTO number, 0 = any).

    ICMP ranges ignore ports: ``PortRange(1)`` admits ICMP echo requests.
    """

    protocol: int = 0
    first: int = 0
    last: int = 65535

    def __post_init__(self) -> None:
        if not 0 <= self.protocol <= 255:
            raise AllowEntryError(f"protocol {self.protocol} is not an IP protocol number")
        if not 0 <= self.first <= self.last <= 65535:
            raise AllowEntryError(f"bad port range {self.first}-{self.last}")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Parse ``tcp/443``, ``udp/1000-2000``, ``icmp`` or ``any``."""
        proto, _, ports = text.partition("/")
        if proto.lower() not in PROTOCOLS:
            raise AllowEntryError(f"unknown protocol in {text!r}")
        number = PROTOCOLS[proto.lower()]
        if not ports:
            return cls(number)
        first, _, last = ports.partition("-")
        return cls(number, int(first), int(last or first))

    def admits(self, protocol: int, port: int | None) -> bool:
        """Report whether a packet of ``protocol`` to ``port`` (None: no ports) matches."""
        if self.protocol and self.protocol != protocol:
            return False
        if port is None or protocol in (1, 58):
            return True
        if protocol not in (6, 17):
            return self.protocol == 0
        return self.first <= port <= self.last

    def __str__(self) -> str:
        name = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.protocol in (1, 58) or (self.first, self.last) == (0, 65535):
            return name
        return f"{name}/{self.first}" if self.first == self.last else f"{name}/{self.first}-{self.last}"


ANY_PORT = (PortRange(),)


@dataclass(frozen=True)
class AllowKey:
    """What identifies an allow entry: the endpoint and the destination prefix."""

    endpoint_id: int
    network: Network

    @property
    def sort_key(self) -> tuple[int, int, int, int]:
        n = self.network
        return (self.endpoint_id, n.version, int(n.network_address), n.prefixlen)

    @property
    def exact(self) -> bool:
        """True for a /32 or /128: these live in the kernel's exact-match hash."""
        return self.network.prefixlen == self.network.max_prefixlen


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """Endpoint ``endpoint_id`` may open flows to ``network`` on ``ports`` until ``expiry_ns``.

    ``network`` accepts an address (a /32 or /128) or a prefix string; ``expiry_ns`` is kernel
    monotonic ns (0 = static).
    """

    endpoint_id: int
    network: Network
    expiry_ns: int = 0
    ports: tuple[PortRange, ...] = ANY_PORT

    def __post_init__(self) -> None:
        net = self.network
        if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            try:
                net = ipaddress.ip_network(net, strict=True)
            except ValueError as exc:
                raise AllowEntryError(f"bad destination {self.network!r}: {exc}") from exc
            object.__setattr__(self, "network", net)
        if not 0 <= self.endpoint_id < 2**32:
            raise AllowEntryError(f"endpoint id {self.endpoint_id} does not fit in u32")
        if self.expiry_ns < 0:
            raise AllowEntryError("expiry_ns must be >= 0 (0 = static)")
        ports = tuple(self.ports)
        if not 1 <= len(ports) <= MAX_PORT_RANGES:
            raise AllowEntryError(
                f"{len(ports)} port ranges for {net}: the datapath holds 1 to {MAX_PORT_RANGES}"
            )
        object.__setattr__(self, "ports", ports)

    @classmethod
    def trusted(cls, endpoint_id: int, network: Network, expiry_ns: int,
                ports: tuple[PortRange, ...]) -> AllowEntry:
        """An entry from fields the caller already holds valid, without ``__post_init__``.

        For the learn stage, which builds one entry per new IP from a registry endpoint id (u32
        by construction), an ipaddress network, its own expiry and merged ranges (1 to
        MAX_PORT_RANGES, ``portmath.merge`` refuses more): checking them again cost a third of
        building an entry. Everything else, input from outside included, uses the constructor.
        """
        entry = _new(cls)
        _set_endpoint_id(entry, endpoint_id)
        _set_network(entry, network)
        _set_expiry_ns(entry, expiry_ns)
        _set_ports(entry, ports)
        return entry

    @property
    def key(self) -> AllowKey:
        """The (endpoint, prefix) this entry replaces on upsert."""
        return AllowKey(self.endpoint_id, self.network)

    @property
    def exact(self) -> bool:
        """True for a /32 or /128 (``key.exact`` without building the key)."""
        return self.network.prefixlen == self.network.max_prefixlen

    def expired(self, now_ns: int) -> bool:
        """Report whether the kernel would treat the entry as expired at ``now_ns``."""
        return self.expiry_ns != 0 and self.expiry_ns <= now_ns


# AllowEntry.trusted stores through the slot descriptors, as the frozen dataclass's own
# __init__ ends up doing through object.__setattr__, at half the cost.
_set_endpoint_id, _set_network, _set_expiry_ns, _set_ports = (
    AllowEntry.__dict__[name].__set__ for name in ("endpoint_id", "network", "expiry_ns", "ports"))


V6_KEY = ipkey.V6  # an IPv6 address's key is its value plus this (ipkey.py)


@dataclass(slots=True)
class HostAllows:
    """Host entries (/32, /128) of one endpoint sharing one port set: one answer's new IPs.

    What the learn stage writes for the IPs one name alone holds, in the form it already has
    them: integer keys (``ipkey.py``: an IPv4 address's value, an IPv6 address's value plus
    ``V6_KEY``) and their expiries, index by index. The kernel writer packs the keys straight
    from the integers; an ``AllowEntry`` and an ipaddress network per IP cost the learn stage a
    quarter of its time (20-IP answers). ``entries()`` gives the same entries as objects.
    """

    endpoint_id: int
    ports: tuple[PortRange, ...]  # merged: 1 to MAX_PORT_RANGES ranges
    keys: list[int] = field(default_factory=list)
    expiries: list[int] = field(default_factory=list)  # kernel ns, never 0 (learned, not static)

    def entries(self) -> list[AllowEntry]:
        """The entries as ``AllowEntry`` objects, in order."""
        return [AllowEntry.trusted(self.endpoint_id, host_key_network(k), expiry, self.ports)
                for k, expiry in zip(self.keys, self.expiries)]

    def __len__(self) -> int:
        return len(self.keys)


def host_key_network(ip_key: int) -> Network:
    """The /32 or /128 of an ``ipkey.py`` key."""
    return host4_network(ip_key) if ip_key < V6_KEY else host6_network(ip_key - V6_KEY)


class AllowMapWriter(Protocol):
    """What the proxy needs from the allow map: write learned entries, forget them."""

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        """Insert or replace entries (one per endpoint and prefix), in batches."""
        ...

    def upsert_hosts(self, batch: HostAllows) -> None:
        """``upsert_allows(batch.entries())``, from the integer keys."""
        ...

    def delete_allows(self, keys: Sequence[AllowKey]) -> int:
        """Delete entries by key; return how many existed."""
        ...


class NullAllowMap:
    """An ``AllowMapWriter`` that writes nothing: the proxy without a datapath."""

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        """Discard ``entries``."""

    def upsert_hosts(self, batch: HostAllows) -> None:
        """Discard ``batch``."""

    def delete_allows(self, keys: Sequence[AllowKey]) -> int:
        """Delete nothing."""
        return 0


class InMemoryAllowMap:
    """An ``AllowMapWriter`` in a dict, matching like the kernel does (for loopback tests).

    Not a model of the kernel's maps, only of their contract: upsert replaces per key, the exact
    (/32, /128) entry is tried first and then the longest covering prefix, expiry is checked
    against the ``now_ns`` the caller passes.
    """

    def __init__(self, entries: Iterable[AllowEntry] = ()) -> None:
        self._entries: dict[tuple[int, Network], AllowEntry] = {}
        self.upsert_allows(list(entries))

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        """Insert or replace ``entries``."""
        for entry in entries:
            self._entries[(entry.endpoint_id, entry.network)] = entry

    def upsert_hosts(self, batch: HostAllows) -> None:
        """Insert or replace the entries of ``batch``."""
        self.upsert_allows(batch.entries())

    def delete_allows(self, keys: Sequence[AllowKey]) -> int:
        """Delete ``keys``; return how many existed."""
        return sum(self._entries.pop((k.endpoint_id, k.network), None) is not None for k in keys)

    def lookup(self, key: AllowKey) -> AllowEntry | None:
        """Return the entry stored under ``key`` (no prefix matching)."""
        return self._entries.get((key.endpoint_id, key.network))

    def dump(self) -> list[AllowEntry]:
        """Return every entry, ordered by endpoint, family, address and prefix length."""
        return sorted(self._entries.values(), key=lambda e: e.key.sort_key)

    def gc(self, now_ns: int, batch: int = 4096) -> int:
        """Delete up to ``batch`` expired entries; return how many."""
        doomed = [k for k, e in self._entries.items() if e.expired(now_ns)][:batch]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def admits(
        self, endpoint_id: int, destination: str | Address, protocol: int, port: int | None, now_ns: int
    ) -> bool:
        """Report whether a new flow would pass the allow stage in the kernel at ``now_ns``."""
        address = ipaddress.ip_address(destination)
        exact = self._entries.get((endpoint_id, ipaddress.ip_network(address)))
        if exact is not None and not exact.expired(now_ns) and _ports_admit(exact, protocol, port):
            return True
        covering = [
            e
            for (eid, net), e in self._entries.items()
            if eid == endpoint_id and net.version == address.version and address in net
            and net.prefixlen < net.max_prefixlen
        ]
        if not covering:
            return False
        longest = max(covering, key=lambda e: e.network.prefixlen)  # the trie returns only this
        return not longest.expired(now_ns) and _ports_admit(longest, protocol, port)

    def __len__(self) -> int:
        return len(self._entries)


def _ports_admit(entry: AllowEntry, protocol: int, port: int | None) -> bool:
    return any(r.admits(protocol, port) for r in entry.ports)
