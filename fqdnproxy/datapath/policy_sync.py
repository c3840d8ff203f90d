"""What the policies say the datapath must hold besides learned IPs, and applying it as a diff.

From one policy snapshot (engine + inventory):

- ``endpoints``: every address of every workload, with ENFORCE_EGRESS if some policy selects it
  for egress and the ifindex of its host-side interface (anti-spoofing) when that interface is
  here;
- ``static``: the static allow entries of each enforced endpoint (toCIDR, toCIDRSet, toEntities,
  toEndpoints, egressDeny). The kernel takes the longest matching prefix and stops, so an entry is
  written for every prefix any rule names (networks, excepts, denies), each carrying the final
  ports for its addresses: the allows containing it, minus their excepts, minus the denies
  containing it. A prefix left with no ports gets the deny marker (``portmath.NO_PORTS``).
  Exact prefixes (/32, /128) are the learner's (``entry_for``), which merges what was learned;
- ``interfaces``: where the program must be attached;
- ``dns_targets``: the DNS servers enforced endpoints may always reach (the proxy).

``apply`` writes only the difference from what was applied before, so a reload touches only what
changed and enforcement never has a gap.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fqdnproxy.datapath import portmath
from fqdnproxy.datapath.allowmap import AllowEntry, AllowKey, PortRange
from fqdnproxy.datapath.maps import EndpointFlags

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
EntryFor = Callable[[object, int, str], AllowEntry | None]


@dataclass(frozen=True)
class DesiredState:
    """Everything static the datapath should hold for one policy snapshot."""

    endpoints: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # ip -> id, flags, ifindex
    static: dict[tuple[int, Network], AllowEntry] = field(default_factory=dict)
    interfaces: dict[str, int] = field(default_factory=dict)  # name -> ifindex
    dns_targets: frozenset[tuple[str, int]] = frozenset()
    missing_interfaces: tuple[str, ...] = ()


def interface_index(name: str) -> int:
    """The ifindex of ``name`` in this network namespace, or 0 when it is not here."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def desired_state(engine: object, registry: object, entry_for: EntryFor,
                  dns_targets: Iterable[tuple[str, int]],
                  ifindex_of: Callable[[str], int] = interface_index,
                  audited: Callable[[object], bool] = lambda endpoint: False) -> DesiredState:
    """The static state for ``engine`` and ``registry`` (policy.engine, endpoints).

    ``audited(endpoint)`` True adds the AUDIT flag to an enforced endpoint (policy/audit_mode.py):
    its would-be drops are counted, reported and passed.
    """
    state = DesiredState(dns_targets=frozenset(dns_targets))
    missing: list[str] = []
    for endpoint in registry.workloads():  # type: ignore[attr-defined]
        policy = engine.for_endpoint(endpoint)  # type: ignore[attr-defined]
        ifindex = ifindex_of(endpoint.interface) if endpoint.interface else 0
        if endpoint.interface and not ifindex:
            missing.append(endpoint.interface)
        flags = EndpointFlags.ENFORCE_EGRESS if policy.enforced else EndpointFlags.NONE
        if policy.enforced and audited(endpoint):
            flags |= EndpointFlags.AUDIT
        for ip in endpoint.ips:
            state.endpoints[ip] = (endpoint.id, int(flags), ifindex)
        if ifindex and policy.enforced:
            state.interfaces[endpoint.interface] = ifindex
        if policy.enforced:
            state.static.update(_static_entries(policy, endpoint.id, entry_for))
    return DesiredState(state.endpoints, state.static, state.interfaces, state.dns_targets,
                        tuple(missing))


def _static_entries(policy: object, endpoint_id: int, entry_for: EntryFor
                    ) -> dict[tuple[int, Network], AllowEntry]:
    allows = policy.allows  # type: ignore[attr-defined]
    denies = policy.denies  # type: ignore[attr-defined]
    prefixes: set[Network] = set()
    for rule in (*allows, *denies):
        prefixes.update(rule.networks)
        prefixes.update(rule.excepts)
    entries: dict[tuple[int, Network], AllowEntry] = {}
    for prefix in prefixes:
        if prefix.prefixlen == prefix.max_prefixlen:
            entry = entry_for(policy, endpoint_id, str(prefix.network_address))
        else:
            ranges = portmath.subtract(_covering(allows, prefix), _covering_ranges(denies, prefix))
            entry = AllowEntry(endpoint_id, prefix, 0, ranges or portmath.NO_PORTS)
        if entry is not None:
            entries[(endpoint_id, prefix)] = entry
    return entries


def _covers(rule: object, prefix: Network) -> bool:
    """Whether every address of ``prefix`` is in one of the rule's networks and no except."""
    def within(outer: Network) -> bool:
        return outer.version == prefix.version and prefix.subnet_of(outer)  # type: ignore[arg-type]

    return (any(within(n) for n in rule.networks)  # type: ignore[attr-defined]
            and not any(within(e) for e in rule.excepts))  # type: ignore[attr-defined]


def _covering(rules: Iterable[object], prefix: Network) -> tuple[PortRange, ...]:
    return tuple(_covering_ranges(rules, prefix))


def _covering_ranges(rules: Iterable[object], prefix: Network) -> list[PortRange]:
    ranges: list[PortRange] = []
    for rule in rules:
        if _covers(rule, prefix):
            ranges += portmath.from_policy(rule.ports)  # type: ignore[attr-defined]
    return ranges


def current_state(datapath: object) -> DesiredState:
    """What the pinned maps hold now (endpoints, static entries), as ``apply``'s ``previous``.

    Learned entries (with an expiry) are not part of it: the learner owns them.
    """
    maps = datapath.maps  # type: ignore[attr-defined]
    endpoints = {str(address): (value.endpoint_id, value.flags, value.ifindex)
                 for address, value in maps.endpoints()}
    static = {(e.endpoint_id, e.network): e
              for e in datapath.dump() if e.expiry_ns == 0}  # type: ignore[attr-defined]
    return DesiredState(endpoints, static)


@dataclass(frozen=True)
class Applied:
    """What one ``apply`` changed."""

    endpoints_set: int = 0
    endpoints_removed: int = 0
    entries_written: int = 0
    entries_deleted: int = 0
    attached: tuple[str, ...] = ()


def apply(datapath: object, desired: DesiredState, previous: DesiredState | None) -> Applied:
    """Make the datapath hold ``desired``, writing only what differs from ``previous``.

    Order matters for a gap-free change: allow entries first, then endpoints (so an endpoint is
    never enforced before its allows exist), attach last; removals after additions.
    """
    previous = previous or DesiredState()
    dp = datapath
    written = [e for key, e in desired.static.items() if previous.static.get(key) != e]
    if written:
        dp.upsert_allows(written)  # type: ignore[attr-defined]
    for ip, port in desired.dns_targets - previous.dns_targets:
        dp.set_dns_target(ip, port)  # type: ignore[attr-defined]
    set_count = 0
    for ip, value in desired.endpoints.items():
        if previous.endpoints.get(ip) != value:
            dp.set_endpoint(ip, *value)  # type: ignore[attr-defined]
            set_count += 1
    attached = []
    for name in desired.interfaces:
        if name not in previous.interfaces:
            dp.attach(name)  # type: ignore[attr-defined]
            attached.append(name)
    removed = 0
    for ip in previous.endpoints.keys() - desired.endpoints.keys():
        dp.remove_endpoint(ip)  # type: ignore[attr-defined]
        removed += 1
    stale = [AllowKey(eid, net) for eid, net in previous.static.keys() - desired.static.keys()]
    deleted = dp.delete_allows(stale) if stale else 0  # type: ignore[attr-defined]
    for ip, port in previous.dns_targets - desired.dns_targets:
        dp.maps.remove_dns_target(ip, port)  # type: ignore[attr-defined]
    return Applied(set_count, removed, len(written), deleted, tuple(attached))
