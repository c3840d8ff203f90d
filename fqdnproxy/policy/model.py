"""Frozen dataclasses for loaded policies: selectors, ports, rules and the policy set.

Everything here is validated by ``load.py`` before it is built; the classes only carry data and a
few pure predicates the engine uses (label matching, port coverage).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["TCP", "UDP", "ANY"]
PolicyKind = Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"  # the label Cilium gives every pod
ANY_SOURCE = "any"  # a selector key without a source, or with "any:", matches every source
DEFAULT_SOURCE = "k8s"  # the source of an inventory label written without one


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Where a rule was written: file, 1-based document index, field path (and the policy)."""

    file: str
    document: int
    path: str
    policy: str = ""  # "namespace/name" or "name" for clusterwide policies

    def __str__(self) -> str:
        where = f"{self.file}: document {self.document}: {self.path}"
        return f"{where} ({self.policy})" if self.policy else where


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One matchLabels entry or matchExpressions item."""

    source: str  # "any", "k8s", "container" or "unspec"
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[tuple[str, str], str]) -> bool:
        """Whether labels keyed by (source, key) satisfy this requirement."""
        present = [
            value
            for (source, key), value in labels.items()
            if key == self.key and (self.source == ANY_SOURCE or source == self.source)
        ]
        if self.operator == "Exists":
            return bool(present)
        if self.operator == "DoesNotExist":
            return not present
        if self.operator == "In":
            return any(value in self.values for value in present)
        return not any(value in self.values for value in present)  # NotIn


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """An endpointSelector or toEndpoints item: all requirements must hold (empty selects all)."""

    requirements: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[tuple[str, str], str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def names_namespace(self) -> bool:
        """Whether the selector constrains the pod namespace label itself."""
        return any(
            r.key == NAMESPACE_LABEL and r.source in (ANY_SOURCE, DEFAULT_SOURCE)
            for r in self.requirements
        )

    def in_namespace(self, namespace: str) -> "LabelSelector":
        """This selector restricted to ``namespace`` (how a namespaced policy scopes selectors)."""
        pin = LabelRequirement(DEFAULT_SOURCE, NAMESPACE_LABEL, "In", frozenset({namespace}))
        return LabelSelector(self.requirements + (pin,))


@dataclass(frozen=True, slots=True)
class FqdnSelector:
    """A toFQDNs or rules.dns item: exactly one of matchName and matchPattern."""

    match_name: str | None
    match_pattern: str | None
    normalized: str  # lowercased with trailing dot, or "*" for all-star patterns

    def __str__(self) -> str:
        if self.match_name is not None:
            return f"matchName: {self.match_name}"
        return f"matchPattern: {self.match_pattern}"


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """Ports first..last (inclusive) of one protocol; ANY means TCP and UDP."""

    protocol: Protocol
    first: int
    last: int

    def covers(self, port: int, protocol: str) -> bool:
        return self.first <= port <= self.last and self.protocol in ("ANY", protocol)

    def __str__(self) -> str:
        if self.first == 0 and self.last == 65535:
            return f"{self.protocol}/all"
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.protocol}/{ports}"


@dataclass(frozen=True, slots=True)
class PortSet:
    """A union of port ranges; the port sets learned IPs and static rules allow."""

    ranges: tuple[PortRange, ...]

    @staticmethod
    def of(ranges: Iterable[PortRange]) -> "PortSet":
        """A normalized set: sorted, without duplicates; anything with all ports is just all."""
        unique = set(ranges)
        if _ALL_RANGE in unique:
            return ALL_PORTS
        return PortSet(tuple(sorted(unique)))

    def covers(self, port: int, protocol: str) -> bool:
        """Whether ``port`` over ``protocol`` ("TCP" or "UDP", any case) is in the set."""
        protocol = protocol.upper()
        return any(r.covers(port, protocol) for r in self.ranges)

    def union(self, other: "PortSet") -> "PortSet":
        return PortSet.of(self.ranges + other.ranges)

    @property
    def is_all(self) -> bool:
        return _ALL_RANGE in self.ranges

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self.ranges) or "none"

    def to_json(self) -> list[dict[str, object]]:
        return [{"protocol": r.protocol, "first": r.first, "last": r.last} for r in self.ranges]


_ALL_RANGE = PortRange("ANY", 0, 65535)
ALL_PORTS = PortSet((_ALL_RANGE,))


@dataclass(frozen=True, slots=True)
class PortRule:
    """One toPorts item: its ports and, if present, the rules.dns names allowed through them."""

    ports: PortSet
    dns: tuple[FqdnSelector, ...] | None = None  # None: no L7 rules (every name)


@dataclass(frozen=True, slots=True)
class CidrRule:
    """A toCIDR item or a toCIDRSet item with its excepts."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return (
            address.version == self.cidr.version
            and address in self.cidr
            and not any(address in e for e in self.excepts)
        )


Entity = Literal["world", "world-ipv4", "world-ipv6", "all"]


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One item of spec.egress. At most one peer field is set; none means every peer."""

    ref: RuleRef
    to_endpoints: tuple[LabelSelector, ...] = ()
    to_cidr: tuple[CidrRule, ...] = ()
    to_entities: tuple[Entity, ...] = ()
    to_fqdns: tuple[FqdnSelector, ...] = ()
    to_ports: tuple[PortRule, ...] = ()

    @property
    def port_rules(self) -> tuple[PortRule, ...]:
        """toPorts, or one all-ports rule without L7 rules when toPorts is absent."""
        return self.to_ports or (PortRule(ALL_PORTS),)

    @property
    def ports(self) -> PortSet:
        """The union of the ports of every toPorts item."""
        result = PortSet(())
        for rule in self.port_rules:
            result = result.union(rule.ports)
        return result


@dataclass(frozen=True, slots=True)
class DenyRule:
    """One item of spec.egressDeny: toCIDR/toCIDRSet (with ports) or toFQDNs (names refused)."""

    ref: RuleRef
    to_cidr: tuple[CidrRule, ...] = ()
    to_fqdns: tuple[FqdnSelector, ...] = ()
    ports: PortSet = ALL_PORTS


@dataclass(frozen=True, slots=True)
class Policy:
    """One CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy spec."""

    kind: PolicyKind
    name: str
    namespace: str | None  # None for clusterwide policies
    file: str
    document: int
    endpoint_selector: LabelSelector  # already scoped to ``namespace`` for namespaced policies
    egress: tuple[EgressRule, ...] = ()
    egress_deny: tuple[DenyRule, ...] = ()
    default_deny_egress: bool = True  # spec.enableDefaultDeny.egress
    has_egress_section: bool = False  # egress or egressDeny present, even if empty

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy loaded from a set of files, plus the warnings loading produced."""

    policies: tuple[Policy, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    files: tuple[str, ...] = ()

