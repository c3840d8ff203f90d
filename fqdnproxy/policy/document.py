"""One CiliumNetworkPolicy YAML document -> ``model.Policy`` objects, problems collected.

``Document`` walks the document field by field. It never stops at the first problem: each is
appended, located by file, document index and field path, and the document then loads nothing.
``load.py`` drives it over files.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from fqdnproxy.policy import match, model

API_VERSION = "cilium.io/v2"
KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
DEFAULT_NAMESPACE = "default"  # where kubectl puts a namespaced policy with no metadata.namespace
LABEL_SOURCES = ("any", "k8s", "container", "unspec")
ENTITIES = ("world", "world-ipv4", "world-ipv6", "all")

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "specs", "status")
# Kubernetes ObjectMeta: anything else under metadata is a typo (``namespce: prod`` would
# otherwise put the policy in ``default``).
METADATA_KEYS = ("name", "namespace", "labels", "annotations", "generateName", "uid", "resourceVersion",
                 "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                 "ownerReferences", "finalizers", "managedFields", "selfLink")
_SPEC_KEYS = ("endpointSelector", "egress", "egressDeny", "ingress", "ingressDeny",
              "enableDefaultDeny", "description", "labels")
_SPEC_UNSUPPORTED = {"nodeSelector": "fqdnproxy enforces endpoints, not nodes (host policies)"}
_PEERS = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toFQDNs")
_EGRESS_UNSUPPORTED = {
    "toServices": "name the service's endpoints with toEndpoints or its addresses with toCIDR",
    "toGroups": "cloud provider groups are not resolved by fqdnproxy",
    "toNodes": "node selectors are not resolved by fqdnproxy",
    "toRequires": "it is deprecated in Cilium",
    "icmps": "fqdnproxy filters TCP and UDP only",
    "authentication": "mutual authentication is not implemented",
}
_PORT_RULE_UNSUPPORTED = {
    "serverNames": "TLS SNI is not inspected",
    "terminatingTLS": "TLS is not terminated",
    "originatingTLS": "TLS is not originated",
    "listener": "there are no Envoy listeners",
}
_L7_UNSUPPORTED = ("http", "kafka", "l7proto", "l7")
# Cilium documents this (PortRule.rules: "If omitted or empty, no layer 7 rules are enforced"), so
# it loads; but ``dns: []`` reads like "no names", hence the warning and the explicit spelling.
_EMPTY_DNS = ('{what} enforces no DNS rule, so every name is allowed on these ports (as in Cilium: '
              '"if omitted or empty, no layer 7 rules are enforced"); write dns: [{{matchPattern: "*"}}] '
              'to allow every name, or list the names')
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")

@dataclass(frozen=True, slots=True)
class Problem:
    """One located error or warning."""

    file: str
    document: int | None
    path: str
    message: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.document is not None:
            parts.append(f"document {self.document}")
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "document": self.document, "path": self.path,
                "message": self.message, "text": str(self)}


def _empty_peer_message(verb: str, has_ports: bool) -> str:
    """Why ``toFQDNs: []`` (or any empty peer list) is refused: Cilium reads it as absent."""
    if has_ports:
        effect = f"{verb} every destination on these ports"
    else:
        effect = f"leave an empty rule that {'allows' if verb == 'allow' else 'denies'} nothing"
    if verb == "allow" and has_ports:
        fix = "list at least one selector, or remove the key for an L4-only rule"
    else:
        fix = "list at least one selector, or remove the rule"
    return f"an empty list selects nothing; Cilium reads it as absent, which would {effect}; {fix}"


def _key_path(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key

@dataclass
class Document:
    """Parses one YAML document, appending located problems instead of stopping at the first."""

    file: str
    number: int
    errors: list[Problem]
    warnings: list[Problem]
    policy_label: str = ""
    namespace: str | None = None
    failed: bool = field(default=False)

    def error(self, path: str, message: str) -> None:
        self.errors.append(Problem(self.file, self.number, path, message))
        self.failed = True

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(self.file, self.number, path, message))

    def ref(self, path: str) -> model.RuleRef:
        return model.RuleRef(self.file, self.number, path, self.policy_label)

    # -- shapes ---------------------------------------------------------------------------------

    def mapping(self, path: str, raw: Any, allowed: Sequence[str],
                unsupported: dict[str, str] | None = None) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.error(path, f"must be a mapping with fields {', '.join(allowed)}")
            return None
        for key in raw:
            if key in allowed:
                continue
            if unsupported and key in unsupported:
                self.error(_key_path(path, str(key)), f"{key} is not supported: {unsupported[key]}")
            else:
                self.error(_key_path(path, str(key)), f"unknown field; allowed: {', '.join(allowed)}")
        return raw

    def items(self, path: str, raw: Any) -> list[Any]:
        if not isinstance(raw, list):
            self.error(path, "must be a list")
            return []
        return raw

    def string(self, path: str, raw: Any) -> str | None:
        if not isinstance(raw, str):
            self.error(path, f"{json.dumps(raw, default=str)} is not a string; quote it")
            return None
        return raw

    # -- documents ------------------------------------------------------------------------------

    def parse(self, raw: Any) -> list[model.Policy]:
        top = self.mapping("", raw, _TOP_KEYS)
        if top is None:
            return []
        if top.get("apiVersion") != API_VERSION:
            self.error("apiVersion", f"{json.dumps(top.get('apiVersion'))} is not supported; only {API_VERSION}")
        kind = top.get("kind")
        if kind not in KINDS:
            self.error("kind", f"{json.dumps(kind)} is not a policy; only {' and '.join(KINDS)} are allowed")
            return []
        name, namespace = self.metadata(kind, top.get("metadata"))
        self.policy_label = f"{namespace}/{name}" if namespace else str(name)
        self.namespace = namespace
        specs: list[tuple[str, Any]] = []
        if "spec" in top:
            specs.append(("spec", top["spec"]))
        if "specs" in top:
            specs.extend((f"specs[{i}]", s) for i, s in enumerate(self.items("specs", top["specs"])))
        if not specs:
            self.error("", f"a {kind} needs spec or specs")
        policies = [self.spec(kind, name, namespace, path, raw_spec) for path, raw_spec in specs]
        if self.failed:
            return []
        return [p for p in policies if p is not None]

    def metadata(self, kind: str, raw: Any) -> tuple[str, str | None]:
        if not isinstance(raw, dict):
            self.error("metadata", "must be a mapping with at least a name")
            return "", None
        for key in raw:
            if key not in METADATA_KEYS:
                close = difflib.get_close_matches(str(key), METADATA_KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error(_key_path("metadata", str(key)), f"unknown field{hint}; allowed: "
                           f"{', '.join(METADATA_KEYS)}")
        for section in ("labels", "annotations"):
            self.string_map(f"metadata.{section}", raw.get(section))
        name = raw.get("name")
        if name is None:
            self.error("metadata.name", "is required")
            name = ""
        elif self.string("metadata.name", name) is None:
            name = ""
        elif not _NAME_RE.fullmatch(name):
            self.error("metadata.name", f"{json.dumps(name)} is not a valid name; "
                       "lowercase letters, digits, - and . are allowed")
            name = ""
        namespace = raw.get("namespace")
        if kind == "CiliumClusterwideNetworkPolicy":
            if namespace is not None:
                self.error("metadata.namespace", "a CiliumClusterwideNetworkPolicy has no namespace")
            return name, None
        if namespace is None:
            return name, DEFAULT_NAMESPACE
        if self.string("metadata.namespace", namespace) is None:
            return name, DEFAULT_NAMESPACE
        if not _NAME_RE.fullmatch(namespace):
            self.error("metadata.namespace", f"{json.dumps(namespace)} is not a valid namespace")
            return name, DEFAULT_NAMESPACE
        return name, namespace

    def string_map(self, path: str, raw: Any) -> None:
        """metadata.labels and .annotations: absent, null, or a mapping of strings to strings."""
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.error(path, "must be a mapping of strings to strings")
            return
        for key, value in raw.items():
            if not isinstance(key, str):
                self.error(path, f"key {json.dumps(key, default=str)} is not a string; quote it")
                continue
            self.string(_key_path(path, key), value)

    def spec(self, kind: str, name: str, namespace: str | None, path: str, raw: Any) -> model.Policy | None:
        spec = self.mapping(path, raw, _SPEC_KEYS, _SPEC_UNSUPPORTED)
        if spec is None:
            return None
        for section in ("ingress", "ingressDeny"):
            if section in spec:
                self.warn(f"{path}.{section}", "not enforced: fqdnproxy enforces egress only")
        if "endpointSelector" not in spec:
            self.error(path, "endpointSelector is required (use {} to select every endpoint)")
            selector = model.LabelSelector()
        else:
            selector = self.label_selector(f"{path}.endpointSelector", spec["endpointSelector"])
        if namespace is not None:
            selector = selector.in_namespace(namespace)
        egress = tuple(
            r for i, item in enumerate(self.items(f"{path}.egress", spec.get("egress", [])))
            if (r := self.egress_rule(f"{path}.egress[{i}]", item)) is not None
        )
        denies = tuple(
            r for i, item in enumerate(self.items(f"{path}.egressDeny", spec.get("egressDeny", [])))
            if (r := self.deny_rule(f"{path}.egressDeny[{i}]", item)) is not None
        )
        for section in ("egress", "egressDeny"):
            if spec.get(section) == []:
                self.warn(f"{path}.{section}", "empty list: it does not make the endpoints default-deny "
                          "(as in Cilium); write [{}] to deny all egress")
        default_deny = True
        if "enableDefaultDeny" in spec:
            flags = self.mapping(f"{path}.enableDefaultDeny", spec["enableDefaultDeny"], ("egress", "ingress"))
            value = (flags or {}).get("egress", True)
            if not isinstance(value, bool):
                self.error(f"{path}.enableDefaultDeny.egress", f"{json.dumps(value)} is not true or false")
            else:
                default_deny = value
        return model.Policy(
            kind=kind, name=name, namespace=namespace, file=self.file, document=self.number,  # type: ignore[arg-type]
            endpoint_selector=selector, egress=egress, egress_deny=denies,
            default_deny_egress=default_deny, has_egress_section=bool(egress or denies),
        )

    # -- selectors ------------------------------------------------------------------------------

    def label_selector(self, path: str, raw: Any) -> model.LabelSelector:
        if raw is None:
            raw = {}
        selector = self.mapping(path, raw, ("matchLabels", "matchExpressions"))
        if selector is None:
            return model.LabelSelector()
        requirements = []
        labels = selector.get("matchLabels") or {}
        if not isinstance(labels, dict):
            self.error(f"{path}.matchLabels", "must be a mapping of label keys to values")
            labels = {}
        for key, value in labels.items():
            key_path = _key_path(f"{path}.matchLabels", str(key))
            source, bare = self.label_key(key_path, key)
            value = self.string(key_path, value)
            if source and value is not None:
                requirements.append(model.LabelRequirement(source, bare, "In", frozenset({value})))
        for i, item in enumerate(self.items(f"{path}.matchExpressions", selector.get("matchExpressions", []))):
            requirement = self.expression(f"{path}.matchExpressions[{i}]", item)
            if requirement is not None:
                requirements.append(requirement)
        return model.LabelSelector(tuple(requirements))

    def label_key(self, path: str, key: Any) -> tuple[str, str]:
        if not isinstance(key, str) or not key:
            self.error(path, "a label key must be a non-empty string")
            return "", ""
        source, sep, bare = key.partition(":")
        if not sep:
            return model.ANY_SOURCE, key
        if source == "reserved":
            self.error(path, f"label source reserved ({bare}) is not supported; "
                       "use toEntities (world, all) for reserved identities")
            return "", ""
        if source not in LABEL_SOURCES:
            self.error(path, f"label source {json.dumps(source)} is not allowed; "
                       f"{', '.join(LABEL_SOURCES)} or none")
            return "", ""
        if not bare:
            self.error(path, "a label key must follow the source")
            return "", ""
        return source, bare

    def expression(self, path: str, raw: Any) -> model.LabelRequirement | None:
        item = self.mapping(path, raw, ("key", "operator", "values"))
        if item is None:
            return None
        source, key = self.label_key(f"{path}.key", item.get("key"))
        operator = item.get("operator")
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            self.error(f"{path}.operator", f"{json.dumps(operator)} is not allowed; "
                       "In, NotIn, Exists or DoesNotExist")
            return None
        values = item.get("values")
        if operator in ("In", "NotIn"):
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                self.error(f"{path}.values", f"{operator} needs a non-empty list of strings")
                return None
        elif values:
            self.error(f"{path}.values", f"{operator} takes no values")
            return None
        if not source:
            return None
        return model.LabelRequirement(source, key, operator, frozenset(values or ()))

    def fqdn_selector(self, path: str, raw: Any) -> model.FqdnSelector | None:
        item = self.mapping(path, raw, ("matchName", "matchPattern"))
        if item is None:
            return None
        has_name, has_pattern = "matchName" in item, "matchPattern" in item
        if has_name == has_pattern:
            which = "both" if has_name else "neither"
            self.error(path, f"has {which} of matchName and matchPattern; exactly one is allowed")
            return None
        key = "matchName" if has_name else "matchPattern"
        text = self.string(f"{path}.{key}", item[key])
        if text is None:
            return None
        try:
            normalized = match.validate_name(text) if has_name else match.validate_pattern(text)
        except match.MatchError as error:
            self.error(f"{path}.{key}", str(error))
            return None
        return model.FqdnSelector(text if has_name else None, None if has_name else text, normalized)

    # -- rules ----------------------------------------------------------------------------------

    def peers(self, path: str, rule: dict[str, Any], verb: str = "allow") -> dict[str, Any]:
        present = [p for p in _PEERS if p in rule]
        if len(present) > 1:
            self.error(path, f"{present[0]} and {present[1]} in one rule are not supported "
                       "(as in Cilium); write one rule for each")
        for key in present:
            # egressDeny already rejects toEndpoints and toEntities by name; say it once.
            if rule[key] == [] and not (verb == "deny" and key in ("toEndpoints", "toEntities")):
                self.error(f"{path}.{key}", _empty_peer_message(verb, "toPorts" in rule))
        result: dict[str, Any] = {}
        if "toEndpoints" in rule:
            selectors = []
            for i, item in enumerate(self.items(f"{path}.toEndpoints", rule["toEndpoints"])):
                selector = self.label_selector(f"{path}.toEndpoints[{i}]", item)
                if self.namespace is not None and not selector.names_namespace:
                    selector = selector.in_namespace(self.namespace)
                selectors.append(selector)
            result["to_endpoints"] = tuple(selectors)
        cidrs = []
        for i, item in enumerate(self.items(f"{path}.toCIDR", rule.get("toCIDR", []))):
            network = self.network(f"{path}.toCIDR[{i}]", item)
            if network is not None:
                cidrs.append(model.CidrRule(network))
        for i, item in enumerate(self.items(f"{path}.toCIDRSet", rule.get("toCIDRSet", []))):
            cidr_rule = self.cidr_set(f"{path}.toCIDRSet[{i}]", item)
            if cidr_rule is not None:
                cidrs.append(cidr_rule)
        result["to_cidr"] = tuple(cidrs)
        entities = []
        for i, item in enumerate(self.items(f"{path}.toEntities", rule.get("toEntities", []))):
            if item not in ENTITIES:
                self.error(f"{path}.toEntities[{i}]", f"entity {json.dumps(item)} is not supported; "
                           f"{', '.join(ENTITIES)} are")
            else:
                entities.append(item)
        result["to_entities"] = tuple(entities)
        fqdns = [
            s for i, item in enumerate(self.items(f"{path}.toFQDNs", rule.get("toFQDNs", [])))
            if (s := self.fqdn_selector(f"{path}.toFQDNs[{i}]", item)) is not None
        ]
        result["to_fqdns"] = tuple(fqdns)
        return result

    def network(self, path: str, raw: Any) -> model.IPNetwork | None:
        text = self.string(path, raw)
        if text is None:
            return None
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(path, f"{json.dumps(text)} is not an IPv4 or IPv6 CIDR such as 192.0.2.0/24")
            return None
        self.error(path, f"{json.dumps(text)} has host bits set; did you mean {loose}?")
        return None

    def cidr_set(self, path: str, raw: Any) -> model.CidrRule | None:
        item = self.mapping(path, raw, ("cidr", "except"), {
            "cidrGroupRef": "CiliumCIDRGroup objects are not read; list the CIDRs",
            "cidrGroupSelector": "CiliumCIDRGroup objects are not read; list the CIDRs",
        })
        if item is None:
            return None
        if "cidr" not in item:
            self.error(path, "cidr is required")
            return None
        network = self.network(f"{path}.cidr", item["cidr"])
        excepts = []
        for i, raw_except in enumerate(self.items(f"{path}.except", item.get("except", []))):
            excluded = self.network(f"{path}.except[{i}]", raw_except)
            if excluded is None or network is None:
                continue
            if excluded.version != network.version or not excluded.subnet_of(network):  # type: ignore[arg-type]
                self.error(f"{path}.except[{i}]", f"{excluded} is not inside {network}")
                continue
            excepts.append(excluded)
        return model.CidrRule(network, tuple(excepts)) if network is not None else None

    def port_rules(self, path: str, raw: Any, allow_rules: bool) -> tuple[model.PortRule, ...]:
        result = []
        for i, item in enumerate(self.items(path, raw)):
            item_path = f"{path}[{i}]"
            rule = self.mapping(item_path, item, ("ports", "rules"), _PORT_RULE_UNSUPPORTED)
            if rule is None:
                continue
            ranges = []
            for j, port in enumerate(self.items(f"{item_path}.ports", rule.get("ports", []))):
                port_range = self.port(f"{item_path}.ports[{j}]", port)
                if port_range is not None:
                    ranges.append(port_range)
            if "ports" not in rule:
                self.error(item_path, "ports is required")
            dns = None
            if "rules" in rule:
                dns = self.l7_rules(f"{item_path}.rules", rule["rules"], allow_rules)
            result.append(model.PortRule(model.PortSet.of(ranges), dns))
        return tuple(result)

    def port(self, path: str, raw: Any) -> model.PortRange | None:
        item = self.mapping(path, raw, ("port", "endPort", "protocol"))
        if item is None:
            return None
        protocol = item.get("protocol", "ANY")
        if not isinstance(protocol, str) or protocol.upper() not in ("TCP", "UDP", "ANY"):
            self.error(f"{path}.protocol", f"{json.dumps(protocol)} is not supported; TCP, UDP or ANY")
            return None
        raw_port = item.get("port", "0")
        if isinstance(raw_port, bool) or not isinstance(raw_port, (int, str)):
            self.error(f"{path}.port", f"{json.dumps(raw_port, default=str)} is not a port number")
            return None
        text = str(raw_port)
        if not text.isdigit():
            self.error(f"{path}.port", f"{json.dumps(text)} is a named port; named ports are not "
                       "supported, use a number from 1 to 65535")
            return None
        first = int(text)
        if first > 65535:
            self.error(f"{path}.port", f"{first} is not a port; 0 (all ports) or 1 to 65535")
            return None
        last = first
        if "endPort" in item:
            end = item["endPort"]
            if isinstance(end, bool) or not isinstance(end, int) or not first <= end <= 65535 or first == 0:
                self.error(f"{path}.endPort", f"{json.dumps(end, default=str)} is not allowed; "
                           f"an integer from port ({first}) to 65535, and port must not be 0")
                return None
            last = end
        if first == 0:
            last = 65535
        return model.PortRange(protocol.upper(), first, last)  # type: ignore[arg-type]

    def l7_rules(self, path: str, raw: Any, allowed: bool) -> tuple[model.FqdnSelector, ...] | None:
        rules = self.mapping(path, raw, ("dns",), {
            key: "fqdnproxy enforces DNS rules only" for key in _L7_UNSUPPORTED})
        if rules is None:
            return None
        if "dns" not in rules:
            if allowed and not rules:
                self.warn(path, _EMPTY_DNS.format(what="an empty mapping"))
            return None
        if not allowed:
            self.error(f"{path}.dns", "rules.dns is not supported here: DNS servers are selected by "
                       "toEndpoints, toCIDR, toCIDRSet or toEntities, never by toFQDNs or in egressDeny")
            return None
        dns = rules["dns"] if rules["dns"] is not None else []
        if dns == []:
            what = "null" if rules["dns"] is None else "an empty list"
            self.warn(f"{path}.dns", _EMPTY_DNS.format(what=what))
        return tuple(
            s for i, item in enumerate(self.items(f"{path}.dns", dns))
            if (s := self.fqdn_selector(f"{path}.dns[{i}]", item)) is not None
        )

    def egress_rule(self, path: str, raw: Any) -> model.EgressRule | None:
        rule = self.mapping(path, raw, _PEERS + ("toPorts",), _EGRESS_UNSUPPORTED)
        if rule is None:
            return None
        peers = self.peers(path, rule)
        to_ports = self.port_rules(f"{path}.toPorts", rule.get("toPorts", []),
                                   allow_rules="toFQDNs" not in rule)
        return model.EgressRule(ref=self.ref(path), to_ports=to_ports, **peers)

    def deny_rule(self, path: str, raw: Any) -> model.DenyRule | None:
        unsupported = dict(_EGRESS_UNSUPPORTED)
        unsupported.update({
            "toEndpoints": "egressDeny supports toCIDR, toCIDRSet and toFQDNs",
            "toEntities": "egressDeny supports toCIDR, toCIDRSet and toFQDNs",
        })
        rule = self.mapping(path, raw, ("toCIDR", "toCIDRSet", "toFQDNs", "toPorts"), unsupported)
        if rule is None:
            return None
        peers = self.peers(path, {k: v for k, v in rule.items() if k in _PEERS or k == "toPorts"}, "deny")
        if not any(k in rule for k in ("toCIDR", "toCIDRSet", "toFQDNs")):
            self.error(path, "an egressDeny rule needs toCIDR, toCIDRSet or toFQDNs")
        ports = model.ALL_PORTS
        if "toPorts" in rule:
            if "toFQDNs" in rule:
                self.error(f"{path}.toPorts", "toPorts with toFQDNs in egressDeny is not supported: "
                           "a denied name is refused at DNS, for every port")
            port_rules = self.port_rules(f"{path}.toPorts", rule["toPorts"], allow_rules=False)
            ports = model.PortSet(())
            for port_rule in port_rules:
                ports = ports.union(port_rule.ports)
        return model.DenyRule(self.ref(path), peers["to_cidr"], peers["to_fqdns"], ports)
