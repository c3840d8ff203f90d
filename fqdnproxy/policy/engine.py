"""The per-endpoint compiled view of the policy set: ``decide`` a query, ``select`` a name's ports.

``PolicyEngine(policy_set, registry)`` compiles one ``EndpointPolicy`` per workload:

- ``enforced``: some policy with egress or egressDeny rules selects the endpoint (Cilium's
  default-deny for egress); an unselected endpoint is default-allow, as in Cilium.
- ``decide(server_ip, port, protocol, name)``: the verdict on a DNS query. Denies win: an
  egressDeny toFQDNs naming ``name``, or an egressDeny toCIDR covering the server. Otherwise the
  query is allowed by a rule whose peer covers the server and whose toPorts cover the port, if its
  ``rules.dns`` matches the name (no rules.dns, or an empty list, allows every name).
- ``select(name)``: the ports that IPs learned for ``name`` get (union over every toFQDNs rule
  selecting it), or None.
- ``allows`` / ``denies``: the static CIDR, entity and endpoint rules for the datapath.

Cost: ``decide`` is two dict lookups and one ``NameMatcher.match`` (a few microseconds whatever
the number of selectors); the per-server matcher is built once and cached. Not thread-safe for
writers, but an engine is immutable after construction except for those caches, whose updates are
single dict assignments.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fqdnproxy import endpoints
from fqdnproxy.policy import match, model
from fqdnproxy.policy.model import IPNetwork, PortSet, RuleRef

NO_RULE = "no rule allows"
DEFAULT_ALLOW = "default allow: no egress policy selects this endpoint"
_ALL_V4 = ipaddress.ip_network("0.0.0.0/0")
_ALL_V6 = ipaddress.ip_network("::/0")
_DNS_CACHE_SIZE = 256  # distinct (server, port, protocol) views kept per endpoint


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one query: allowed or not, the deciding rule and a readable reason."""

    allowed: bool
    rule: RuleRef | None
    reason: str

    def to_json(self) -> dict[str, object]:
        rule = None
        if self.rule is not None:
            rule = {"file": self.rule.file, "document": self.rule.document,
                    "path": self.rule.path, "policy": self.rule.policy}
        return {"allowed": self.allowed, "rule": rule, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class StaticRule:
    """A static allow or deny for the datapath: addresses in ``networks`` but not in ``excepts``."""

    ref: RuleRef
    networks: tuple[IPNetwork, ...]
    ports: PortSet
    excepts: tuple[IPNetwork, ...] = ()

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in n for n in self.networks if n.version == address.version) and not any(
            address in e for e in self.excepts if e.version == address.version)

    def to_json(self) -> dict[str, object]:
        return {"rule": str(self.ref), "networks": [str(n) for n in self.networks],
                "except": [str(e) for e in self.excepts], "ports": self.ports.to_json()}


@dataclass(frozen=True, slots=True)
class SelectionChange:
    """An (endpoint, name) whose learned IPs now get other ports (None: no longer allowed)."""

    endpoint_id: int
    name: str
    before: PortSet | None
    after: PortSet | None


@dataclass(slots=True)
class _DnsView:
    """What one endpoint may ask one (server, port, protocol): compiled once, then cached."""

    denied: Decision | None = None
    all_names: Decision | None = None
    matcher: match.NameMatcher = field(default_factory=match.NameMatcher)
    decisions: list[Decision] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _DnsRule:
    """An egress rule that can reach a DNS server: who it covers, and its toPorts."""

    ref: RuleRef
    peers: tuple[StaticRule, ...]  # empty: the rule selects nothing (an empty rule, ``{}``)
    port_rules: tuple[model.PortRule, ...]
    explicit_ports: bool  # toPorts was written (paths then name the toPorts item)


class EndpointPolicy:
    """Everything one endpoint's egress is subject to, compiled for the hot path."""

    def __init__(self, endpoint: endpoints.Endpoint, enforced: bool, policies: tuple[str, ...],
                 allows: tuple[StaticRule, ...], denies: tuple[StaticRule, ...],
                 fqdn_rules: tuple[tuple[RuleRef, model.FqdnSelector, PortSet], ...],
                 deny_names: tuple[tuple[RuleRef, model.FqdnSelector], ...],
                 dns_rules: tuple[_DnsRule, ...]) -> None:
        self.endpoint = endpoint
        self.enforced = enforced
        self.policies = policies  # labels of the policies selecting this endpoint
        self.allows = allows
        self.denies = denies
        self.fqdn_rules = fqdn_rules
        self.deny_names = deny_names
        self._dns_rules = dns_rules
        # toFQDNs selectors (value: their index in fqdn_rules) and, as -1 - their index in
        # deny_names, egressDeny ones: ``select`` needs both, and one walk costs half of two.
        self._fqdn = match.NameMatcher()
        for index, (_, selector, _) in enumerate(fqdn_rules):
            self._fqdn.add_pattern(selector.normalized, index)
        for index, (_, selector) in enumerate(deny_names):
            self._fqdn.add_pattern(selector.normalized, -1 - index)
        self._fqdn.freeze()
        self._deny = match.NameMatcher()
        self._deny_decisions = []
        for index, (ref, selector) in enumerate(deny_names):
            self._deny.add_pattern(selector.normalized, index)
            self._deny_decisions.append(Decision(False, ref, f"denied by egressDeny toFQDNs {selector}"))
        self._deny.freeze()
        self._views: dict[tuple[str, int, str], _DnsView] = {}
        self._matchers: dict[tuple[tuple[int, int], ...], tuple[match.NameMatcher, list[Decision]]] = {}
        self._ports: dict[frozenset[int], PortSet] = {}

    def decide(self, server_ip: str, port: int, protocol: str, name: str) -> Decision:
        """The verdict on a query for ``name`` sent to ``server_ip``:``port`` over ``protocol``."""
        if self._deny:
            hits = self._deny.match(name)
            if hits:
                return self._deny_decisions[min(hits)]
        if not self.enforced:
            return _DEFAULT_ALLOW
        view = self._views.get((server_ip, port, protocol))
        if view is None:
            view = self._view(server_ip, port, protocol)
        if view.denied is not None:
            return view.denied
        if view.all_names is not None:
            return view.all_names
        if view.matcher:
            hits = view.matcher.match(name)
            if hits:
                return view.decisions[min(hits)]
        return _NO_RULE

    def select(self, name: str) -> PortSet | None:
        """The ports IPs learned for ``name`` get, or None if no toFQDNs rule selects it."""
        if not self.enforced:
            return None
        hits = self._fqdn.match(name)
        if not hits or min(hits) < 0:  # no toFQDNs selector selects it, or an egressDeny one does
            return None
        key = frozenset(hits)
        ports = self._ports.get(key)
        if ports is None:
            ports = PortSet(())
            for index in key:
                ports = ports.union(self.fqdn_rules[index][2])
            self._ports[key] = ports
        return ports

    def selecting(self, name: str) -> tuple[RuleRef, ...]:
        """The toFQDNs selectors (as rule references) that select ``name``, in file order."""
        return tuple(self.fqdn_rules[i][0] for i in sorted(self._fqdn.match(name)) if i >= 0)

    def warm(self, servers: Iterable[str], port: int = 53) -> None:
        """Build the DNS views of ``servers`` now (UDP and TCP), so no query pays for compiling."""
        if self.enforced:
            for server in servers:
                for protocol in ("UDP", "TCP"):
                    self._view(server, port, protocol)

    def _view(self, server_ip: str, port: int, protocol: str) -> _DnsView:
        view = _DnsView()
        try:
            address = ipaddress.ip_address(endpoints.normalize_ip(server_ip))
        except ValueError:
            address = None
        proto = protocol.upper()
        applicable: list[tuple[int, int]] = []
        if address is not None:
            for deny in self.denies:
                if deny.covers(address) and deny.ports.covers(port, proto):
                    view.denied = Decision(False, deny.ref, f"denied by egressDeny: {server_ip} port "
                                           f"{port}/{proto} is denied")
                    break
            for index, rule in enumerate(self._dns_rules):
                if not any(peer.covers(address) for peer in rule.peers):
                    continue
                for i, port_rule in enumerate(rule.port_rules):
                    if not port_rule.ports.covers(port, proto):
                        continue
                    if not port_rule.dns:
                        if view.all_names is None:
                            why = "no rules.dns" if port_rule.dns is None else "empty rules.dns"
                            view.all_names = Decision(True, self._port_rule_ref(rule, i), f"allowed: {why}, every name")
                        continue
                    applicable.append((index, i))
        # Servers reached through the same rules share one compiled matcher.
        key = tuple(applicable)
        shared = self._matchers.get(key)
        if shared is None:
            matcher, decisions = match.NameMatcher(), []
            for index, i in applicable:
                rule = self._dns_rules[index]
                base = self._port_rule_ref(rule, i)
                for j, selector in enumerate(rule.port_rules[i].dns or ()):
                    ref = RuleRef(base.file, base.document, f"{base.path}.rules.dns[{j}]", base.policy)
                    matcher.add_pattern(selector.normalized, len(decisions))
                    decisions.append(Decision(True, ref, f"allowed by rules.dns {selector}"))
            shared = self._matchers[key] = (matcher.freeze(), decisions)
        view.matcher, view.decisions = shared
        if len(self._views) >= _DNS_CACHE_SIZE:
            self._views.clear()
        self._views[(server_ip, port, protocol)] = view
        return view

    @staticmethod
    def _port_rule_ref(rule: _DnsRule, index: int) -> RuleRef:
        path = f"{rule.ref.path}.toPorts[{index}]" if rule.explicit_ports else rule.ref.path
        return RuleRef(rule.ref.file, rule.ref.document, path, rule.ref.policy)

    def to_json(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint.to_json(),
            "enforced": self.enforced,
            "policies": list(self.policies),
            "allows": [a.to_json() for a in self.allows],
            "denies": [d.to_json() for d in self.denies],
            "fqdns": [{"rule": str(r), "selector": str(s), "ports": p.to_json()} for r, s, p in self.fqdn_rules],
            "deny_names": [{"rule": str(r), "selector": str(s)} for r, s in self.deny_names],
        }


_DEFAULT_ALLOW = Decision(True, None, DEFAULT_ALLOW)
_NO_RULE = Decision(False, None, NO_RULE)


class PolicyEngine:
    """All endpoints' compiled policies for one policy set and one registry. Immutable."""

    def __init__(self, policy_set: model.PolicySet, registry: endpoints.EndpointRegistry) -> None:
        self.policy_set = policy_set
        self.registry = registry
        self._peer_ips: dict[int, frozenset[str]] = {}
        self._by_id: dict[int, EndpointPolicy] = {}
        dns_servers = [ip for ep in registry if ep.kind == "service" for ip in ep.ips]
        for endpoint in registry.workloads():
            compiled = self._by_id[endpoint.id] = self._compile(endpoint)
            compiled.warm(dns_servers)

    def for_endpoint(self, endpoint: endpoints.Endpoint) -> EndpointPolicy:
        """The compiled policy of ``endpoint`` (compiled now if it is not in the registry)."""
        compiled = self._by_id.get(endpoint.id)
        if compiled is not None and compiled.endpoint == endpoint:
            return compiled
        return self._compile(endpoint)

    def for_id(self, endpoint_id: int) -> EndpointPolicy | None:
        """The compiled policy of the registry's workload ``endpoint_id``, or None."""
        return self._by_id.get(endpoint_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())

    def _compile(self, endpoint: endpoints.Endpoint) -> EndpointPolicy:
        labels = endpoint.selector_labels()
        selecting = [p for p in self.policy_set.policies if p.endpoint_selector.matches(labels)]
        egress_policies = [p for p in selecting if p.has_egress_section]
        enforced = bool(egress_policies)
        allows: list[StaticRule] = []
        denies: list[StaticRule] = []
        fqdn_rules: list[tuple[RuleRef, model.FqdnSelector, PortSet]] = []
        deny_names: list[tuple[RuleRef, model.FqdnSelector]] = []
        dns_rules: list[_DnsRule] = []
        if enforced and not any(p.default_deny_egress for p in egress_policies):
            # Cilium: enableDefaultDeny.egress=false adds a wildcard allow; denies still apply.
            first = egress_policies[0]
            ref = RuleRef(first.file, first.document, "spec.enableDefaultDeny.egress", first.label)
            peer = StaticRule(ref, (_ALL_V4, _ALL_V6), model.ALL_PORTS)
            allows.append(peer)
            dns_rules.append(_DnsRule(ref, (peer,), (model.PortRule(model.ALL_PORTS),), False))
        for policy in egress_policies:
            for rule in policy.egress:
                if rule.to_fqdns:
                    for j, selector in enumerate(rule.to_fqdns):
                        ref = RuleRef(rule.ref.file, rule.ref.document, f"{rule.ref.path}.toFQDNs[{j}]",
                                      rule.ref.policy)
                        fqdn_rules.append((ref, selector, rule.ports))
                    continue
                peers = self._peers(rule)
                allows.extend(peers)
                dns_rules.append(_DnsRule(rule.ref, peers, rule.port_rules, bool(rule.to_ports)))
            for deny in policy.egress_deny:
                for j, selector in enumerate(deny.to_fqdns):
                    ref = RuleRef(deny.ref.file, deny.ref.document, f"{deny.ref.path}.toFQDNs[{j}]",
                                  deny.ref.policy)
                    deny_names.append((ref, selector))
                for cidr in deny.to_cidr:
                    denies.append(StaticRule(deny.ref, (cidr.cidr,), deny.ports, cidr.excepts))
        return EndpointPolicy(endpoint, enforced, tuple(p.label for p in selecting), tuple(allows),
                              tuple(denies), tuple(fqdn_rules), tuple(deny_names), tuple(dns_rules))

    def _peers(self, rule: model.EgressRule) -> tuple[StaticRule, ...]:
        """The addresses an egress rule (not toFQDNs) allows, as static rules; () for none."""
        ports = rule.ports
        if rule.to_endpoints:
            ips = self._endpoint_ips(rule)
            networks = tuple(sorted((ipaddress.ip_network(ip) for ip in ips), key=_network_order))
            return (StaticRule(rule.ref, networks, ports),)
        if rule.to_cidr:
            return tuple(StaticRule(rule.ref, (c.cidr,), ports, c.excepts) for c in rule.to_cidr)
        if rule.to_entities:
            networks_set: set[IPNetwork] = set()
            for entity in rule.to_entities:
                if entity in ("all", "world", "world-ipv4"):
                    networks_set.add(_ALL_V4)
                if entity in ("all", "world", "world-ipv6"):
                    networks_set.add(_ALL_V6)
            networks = tuple(sorted(networks_set, key=_network_order))
            if "all" in rule.to_entities:
                return (StaticRule(rule.ref, networks, ports),)
            # The world is everything that is not an endpoint of the inventory.
            excepts = tuple(sorted((ipaddress.ip_network(ip) for ip in self.registry.ips
                                    if any(n.version == ipaddress.ip_address(ip).version for n in networks)),
                                   key=_network_order))
            return (StaticRule(rule.ref, networks, ports, excepts),)
        if rule.to_ports:  # an L4-only rule: every peer on these ports
            return (StaticRule(rule.ref, (_ALL_V4, _ALL_V6), ports),)
        return ()  # an empty rule ``{}`` allows nothing (it only makes the endpoint default-deny)

    def _endpoint_ips(self, rule: model.EgressRule) -> frozenset[str]:
        cached = self._peer_ips.get(id(rule))
        if cached is None:
            ips = set()
            for endpoint in self.registry:
                labels = endpoint.selector_labels()
                if any(selector.matches(labels) for selector in rule.to_endpoints):
                    ips.update(endpoint.ips)
            cached = self._peer_ips[id(rule)] = frozenset(ips)
        return cached


def _network_order(network: IPNetwork) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


def changed_selections(old: PolicyEngine | None, new: PolicyEngine,
                       names_by_endpoint: Mapping[int, Iterable[str]]) -> list[SelectionChange]:
    """The (endpoint, name) pairs, among names already resolved, whose ``select`` result changed.

    ``names_by_endpoint`` maps endpoint ids to the names their cache holds; only the cache knows
    which names were resolved, so it asks. An endpoint missing from ``new`` loses every selection.
    """
    changes = []
    for endpoint_id, names in names_by_endpoint.items():
        before_policy = old.for_id(endpoint_id) if old is not None else None
        after_policy = new.for_id(endpoint_id)
        for name in names:
            before = before_policy.select(name) if before_policy is not None else None
            after = after_policy.select(name) if after_policy is not None else None
            if before != after:
                changes.append(SelectionChange(endpoint_id, name, before, after))
    return changes


def changed_endpoints(old: PolicyEngine | None, new: PolicyEngine) -> list[int]:
    """Ids of workloads added, removed, or whose record, enforcement or static rules changed."""
    old_ids = set(old._by_id) if old is not None else set()
    changed = []
    for endpoint_id in sorted(old_ids | set(new._by_id)):
        before = old.for_id(endpoint_id) if old is not None else None
        after = new.for_id(endpoint_id)
        if before is None or after is None or (
            before.endpoint, before.enforced, before.allows, before.denies
        ) != (after.endpoint, after.enforced, after.allows, after.denies):
            changed.append(endpoint_id)
    return changed
