"""Loading CiliumNetworkPolicy YAML: what loads, and every error located and explained."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fqdnproxy.policy import load, model

HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: shop}\n"
VALID = HEAD + "spec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toFQDNs: [{matchName: a.example}]\n"


def errors(text: str, label: str = "policies/web.yaml") -> list[str]:
    return [str(p) for p in load.parse_text(label, text).errors]


def test_issue_example_message() -> None:
    second = HEAD + """spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{}]
  - toFQDNs:
    - matchPattern: "*.ex ample.com"
"""
    assert errors(VALID + "---\n" + second) == [
        'policies/web.yaml: document 2: spec.egress[1].toFQDNs[0].matchPattern: "*.ex ample.com" contains " "; '
        "only letters, digits and - _ . * are allowed"
    ]


def test_full_policy_loads_into_dataclasses() -> None:
    text = HEAD + """spec:
  endpointSelector:
    matchLabels: {"k8s:app": web, "any:tier": front, team: a}
    matchExpressions:
    - {key: env, operator: In, values: [prod, staging]}
    - {key: "k8s:legacy", operator: DoesNotExist}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*"}]}
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
    toPorts: [{ports: [{port: 8000, endPort: 8100, protocol: tcp}]}]
  - toCIDR: ["2001:db8::/32"]
  - toEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: "**.example.org"}]
  egressDeny:
  - toCIDR: [203.0.113.0/24]
    toPorts: [{ports: [{port: "25"}]}]
  - toFQDNs: [{matchName: bad.example.com}]
"""
    report = load.parse_text("web.yaml", text)
    assert report.errors == ()
    [policy] = report.policies
    assert (policy.kind, policy.namespace, policy.name, policy.label) == (
        "CiliumNetworkPolicy", "shop", "web", "shop/web")
    requirements = policy.endpoint_selector.requirements
    assert model.LabelRequirement("k8s", "app", "In", frozenset({"web"})) in requirements
    assert model.LabelRequirement("any", "tier", "In", frozenset({"front"})) in requirements
    assert model.LabelRequirement("any", "team", "In", frozenset({"a"})) in requirements
    assert model.LabelRequirement("any", "env", "In", frozenset({"prod", "staging"})) in requirements
    assert model.LabelRequirement("k8s", "legacy", "DoesNotExist") in requirements
    # a namespaced policy selects its own namespace only
    assert model.LabelRequirement("k8s", model.NAMESPACE_LABEL, "In", frozenset({"shop"})) in requirements
    dns, cidr_set, cidr, world, fqdns = policy.egress
    assert dns.to_ports[0].ports == model.PortSet((model.PortRange("ANY", 53, 53),))
    assert dns.to_ports[0].dns == (model.FqdnSelector(None, "*", "*"),)
    assert not dns.to_endpoints[0].requirements[0].key.startswith("k8s:")
    assert cidr_set.to_cidr == (model.CidrRule(ipaddress.ip_network("192.0.2.0/24"),
                                               (ipaddress.ip_network("192.0.2.128/25"),)),)
    assert cidr_set.ports == model.PortSet((model.PortRange("TCP", 8000, 8100),))
    assert cidr.ports == model.ALL_PORTS
    assert world.to_entities == ("world",)
    assert [s.normalized for s in fqdns.to_fqdns] == ["api.example.com.", "**.example.org."]
    deny_cidr, deny_name = policy.egress_deny
    assert deny_cidr.ports == model.PortSet((model.PortRange("ANY", 25, 25),))
    assert deny_name.to_fqdns[0].match_name == "bad.example.com"
    assert fqdns.ref == model.RuleRef("web.yaml", 1, "spec.egress[4]", "shop/web")


def test_specs_clusterwide_and_default_namespace() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all-pods}
specs:
- endpointSelector: {}
  egress: [{toEntities: [all]}]
- endpointSelector: {matchLabels: {app: x}}
  egress: [{toFQDNs: [{matchName: x.example}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: plain}
spec:
  endpointSelector: {}
  egress: [{}]
"""
    report = load.parse_text("cw.yaml", text)
    assert report.errors == ()
    first, second, third = report.policies
    assert first.namespace is None and first.endpoint_selector.requirements == ()
    assert second.egress[0].ref.path == "specs[1].egress[0]"
    assert third.namespace == "default" and third.document == 2
    assert third.egress[0] == model.EgressRule(model.RuleRef("cw.yaml", 2, "spec.egress[0]", "default/plain"))


def test_ingress_is_loaded_with_a_warning() -> None:
    report = load.parse_text("in.yaml", VALID + "  ingress:\n  - fromEndpoints: [{}]\n  ingressDeny: []\n")
    assert report.errors == ()
    assert [str(w) for w in report.warnings] == [
        "in.yaml: document 1: spec.ingress: not enforced: fqdnproxy enforces egress only",
        "in.yaml: document 1: spec.ingressDeny: not enforced: fqdnproxy enforces egress only",
    ]
    assert len(report.policies) == 1


def rule(body: str) -> str:
    return HEAD + "spec:\n  endpointSelector: {}\n  egress:\n  - " + body.replace("\n", "\n    ") + "\n"


# (document text, the exact error messages) -- unsupported features are rejected by name.
ERROR_CASES = [
    (rule("toPorts:\n- ports: [{port: '80', protocol: TCP}]\n  rules: {http: [{method: GET}]}"),
     ["spec.egress[0].toPorts[0].rules.http: http is not supported: fqdnproxy enforces DNS rules only"]),
    (rule("toPorts:\n- ports: [{port: '9092'}]\n  rules: {kafka: [{topic: x}]}"),
     ["spec.egress[0].toPorts[0].rules.kafka: kafka is not supported: fqdnproxy enforces DNS rules only"]),
    (rule("toServices: [{k8sService: {serviceName: db}}]"),
     ["spec.egress[0].toServices: toServices is not supported: name the service's endpoints with toEndpoints "
      "or its addresses with toCIDR"]),
    (rule("toGroups: [{aws: {}}]"),
     ["spec.egress[0].toGroups: toGroups is not supported: cloud provider groups are not resolved by fqdnproxy"]),
    (rule("icmps: [{fields: [{type: 8}]}]"),
     ["spec.egress[0].icmps: icmps is not supported: fqdnproxy filters TCP and UDP only"]),
    (rule("toFQDNs: [{matchName: a.example}]\ntoPorts:\n- ports: [{port: '443'}]\n  serverNames: [a.example]"),
     ["spec.egress[0].toPorts[0].serverNames: serverNames is not supported: TLS SNI is not inspected"]),
    (rule("toPorts: [{ports: [{port: https, protocol: TCP}]}]"),
     ['spec.egress[0].toPorts[0].ports[0].port: "https" is a named port; named ports are not supported, '
      "use a number from 1 to 65535"]),
    (rule("toPorts: [{ports: [{port: '3868', protocol: SCTP}]}]"),
     ['spec.egress[0].toPorts[0].ports[0].protocol: "SCTP" is not supported; TCP, UDP or ANY']),
    (rule("toPorts: [{ports: [{port: '70000'}]}]"),
     ["spec.egress[0].toPorts[0].ports[0].port: 70000 is not a port; 0 (all ports) or 1 to 65535"]),
    (rule("toPorts: [{ports: [{port: '80', endPort: 79}]}]"),
     ["spec.egress[0].toPorts[0].ports[0].endPort: 79 is not allowed; an integer from port (80) to 65535, "
      "and port must not be 0"]),
    (rule("toEntities: [host, world]"),
     ['spec.egress[0].toEntities[0]: entity "host" is not supported; world, world-ipv4, world-ipv6, all are']),
    (rule("toEndpoints: [{matchLabels: {'reserved:host': ''}}]"),
     ['spec.egress[0].toEndpoints[0].matchLabels["reserved:host"]: label source reserved (host) is not '
      "supported; use toEntities (world, all) for reserved identities"]),
    (rule("toEndpoints: [{matchLabels: {'cni:x': y}}]"),
     ['spec.egress[0].toEndpoints[0].matchLabels["cni:x"]: label source "cni" is not allowed; '
      "any, k8s, container, unspec or none"]),
    (rule("toEndpoints: [{matchExpressions: [{key: a, operator: Gt, values: ['1']}, {key: b, operator: In}]}]"),
     ['spec.egress[0].toEndpoints[0].matchExpressions[0].operator: "Gt" is not allowed; '
      "In, NotIn, Exists or DoesNotExist",
      "spec.egress[0].toEndpoints[0].matchExpressions[1].values: In needs a non-empty list of strings"]),
    (rule("toEndpoints: [{}]\ntoCIDR: [192.0.2.0/24]"),
     ["spec.egress[0]: toEndpoints and toCIDR in one rule are not supported (as in Cilium); write one rule for each"]),
    (rule("toCIDR: [192.0.2.1/24, 'not a cidr']"),
     ['spec.egress[0].toCIDR[0]: "192.0.2.1/24" has host bits set; did you mean 192.0.2.0/24?',
      'spec.egress[0].toCIDR[1]: "not a cidr" is not an IPv4 or IPv6 CIDR such as 192.0.2.0/24']),
    (rule("toCIDRSet: [{cidr: 192.0.2.0/24, except: [198.51.100.0/24]}, {cidrGroupRef: g}]"),
     ["spec.egress[0].toCIDRSet[0].except[0]: 198.51.100.0/24 is not inside 192.0.2.0/24",
      "spec.egress[0].toCIDRSet[1].cidrGroupRef: cidrGroupRef is not supported: CiliumCIDRGroup objects are "
      "not read; list the CIDRs",
      "spec.egress[0].toCIDRSet[1]: cidr is required"]),
    (rule("toFQDNs: [{matchName: a.example, matchPattern: '*.example'}, {}]"),
     ["spec.egress[0].toFQDNs[0]: has both of matchName and matchPattern; exactly one is allowed",
      "spec.egress[0].toFQDNs[1]: has neither of matchName and matchPattern; exactly one is allowed"]),
    (rule("toFQDNs: [{matchName: '*.example'}, {matchPattern: " + "a" * 256 + "}]"),
     ['spec.egress[0].toFQDNs[0].matchName: "*.example" contains "*"; matchName is exact, use matchPattern '
      "for wildcards",
      f'spec.egress[0].toFQDNs[1].matchPattern: "{"a" * 256}" is 256 characters long; at most 255 are allowed']),
    (rule("toFQDNs: [{matchName: a.example}]\ntoPorts:\n- ports: [{port: '53'}]\n  rules: {dns: [{matchPattern: '*'}]}"),
     ["spec.egress[0].toPorts[0].rules.dns: rules.dns is not supported here: DNS servers are selected by "
      "toEndpoints, toCIDR, toCIDRSet or toEntities, never by toFQDNs or in egressDeny"]),
    (rule("toPorts: [{rules: {dns: [{matchName: a.example}]}}]"),
     ["spec.egress[0].toPorts[0]: ports is required"]),
    (rule("toFQDN: [{matchName: a.example}]"),
     ["spec.egress[0].toFQDN: unknown field; allowed: toEndpoints, toCIDR, toCIDRSet, toEntities, toFQDNs, "
      "toPorts"]),
    (HEAD + "spec:\n  endpointSelector: {}\n  egressDeny:\n  - toEndpoints: [{}]\n  - toFQDNs: [{matchName: a.b}]\n"
     "    toPorts: [{ports: [{port: '443'}]}]\n  - toPorts: [{ports: [{port: '25'}]}]\n",
     ["spec.egressDeny[0].toEndpoints: toEndpoints is not supported: egressDeny supports toCIDR, toCIDRSet "
      "and toFQDNs",
      "spec.egressDeny[0]: an egressDeny rule needs toCIDR, toCIDRSet or toFQDNs",
      "spec.egressDeny[1].toPorts: toPorts with toFQDNs in egressDeny is not supported: a denied name is "
      "refused at DNS, for every port",
      "spec.egressDeny[2]: an egressDeny rule needs toCIDR, toCIDRSet or toFQDNs"]),
    (HEAD + "spec:\n  nodeSelector: {}\n  egress: [{}]\n  enableDefaultDeny: {egress: maybe}\n",
     ["spec.nodeSelector: nodeSelector is not supported: fqdnproxy enforces endpoints, not nodes (host policies)",
      "spec: endpointSelector is required (use {} to select every endpoint)",
      'spec.enableDefaultDeny.egress: "maybe" is not true or false']),
    ("apiVersion: v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {}\n",
     ['apiVersion: "v1" is not supported; only cilium.io/v2',
      'kind: "NetworkPolicy" is not a policy; only CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy '
      "are allowed"]),
    ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: X_1, namespace: a}\n",
     ['metadata.name: "X_1" is not a valid name; lowercase letters, digits, - and . are allowed',
      "metadata.namespace: a CiliumClusterwideNetworkPolicy has no namespace",
      "a CiliumClusterwideNetworkPolicy needs spec or specs"]),
    (HEAD + "spec:\n  endpointSelector: {matchLabels: {app: 1}}\n  egress: [{toFQDNs: [{matchName: a.b}]}]\n"
     "  egress: []\n",
     ['line 7 column 3: duplicate key "egress"']),
    ("- just\n- a list\n",
     ["must be a mapping with fields apiVersion, kind, metadata, spec, specs, status"]),
]


@pytest.mark.parametrize("text,messages", ERROR_CASES)
def test_errors_name_file_document_and_path(text: str, messages: list[str]) -> None:
    found = errors(text, "p.yaml")
    expected = []
    for message in messages:
        if message.startswith("line "):
            expected.append(f"p.yaml: document 1: invalid YAML: {message}")
        else:
            expected.append(f"p.yaml: document 1: {message}")
    assert found == expected


EMPTY_ALLOW_ON_PORTS = ("an empty list selects nothing; Cilium reads it as absent, which would allow every "
                        "destination on these ports; list at least one selector, or remove the key for an "
                        "L4-only rule")
EMPTY_ALLOW = ("an empty list selects nothing; Cilium reads it as absent, which would leave an empty rule that "
               "allows nothing; list at least one selector, or remove the rule")
EMPTY_DENY_ON_PORTS = ("an empty list selects nothing; Cilium reads it as absent, which would deny every "
                       "destination on these ports; list at least one selector, or remove the rule")
EMPTY_DENY = ("an empty list selects nothing; Cilium reads it as absent, which would leave an empty rule that "
              "denies nothing; list at least one selector, or remove the rule")
PORT_443 = "\ntoPorts: [{ports: [{port: '443', protocol: TCP}]}]"


def deny(body: str) -> str:
    return HEAD + "spec:\n  endpointSelector: {}\n  egressDeny:\n  - " + body.replace("\n", "\n    ") + "\n"


# An empty peer list is an error, never an L4-only rule: Cilium reads [] as absent, so
# ``toFQDNs: []`` with toPorts would allow every destination on those ports.
EMPTY_PEER_CASES = [
    pytest.param(rule(f"{peer}: []" + PORT_443), [f"spec.egress[0].{peer}: {EMPTY_ALLOW_ON_PORTS}"], id=f"{peer}-ports")
    for peer in ("toFQDNs", "toEndpoints", "toCIDR", "toCIDRSet", "toEntities")
] + [
    pytest.param(rule("toFQDNs: []"), [f"spec.egress[0].toFQDNs: {EMPTY_ALLOW}"], id="toFQDNs-no-ports"),
    pytest.param(rule("toEndpoints: []\ntoPorts:\n- ports: [{port: '53'}]\n  rules: {dns: [{matchPattern: '*'}]}"),
                 [f"spec.egress[0].toEndpoints: {EMPTY_ALLOW_ON_PORTS}"], id="toEndpoints-dns-rule"),
    pytest.param(deny("toCIDR: []\ntoPorts: [{ports: [{port: '25'}]}]"),
                 [f"spec.egressDeny[0].toCIDR: {EMPTY_DENY_ON_PORTS}"], id="deny-toCIDR-ports"),
    pytest.param(deny("toCIDRSet: []"), [f"spec.egressDeny[0].toCIDRSet: {EMPTY_DENY}"], id="deny-toCIDRSet"),
    pytest.param(deny("toFQDNs: []"), [f"spec.egressDeny[0].toFQDNs: {EMPTY_DENY}"], id="deny-toFQDNs"),
    pytest.param(deny("toEndpoints: []"),  # named once, as unsupported
                 ["spec.egressDeny[0].toEndpoints: toEndpoints is not supported: egressDeny supports toCIDR, "
                  "toCIDRSet and toFQDNs",
                  "spec.egressDeny[0]: an egressDeny rule needs toCIDR, toCIDRSet or toFQDNs"], id="deny-toEndpoints"),
    pytest.param(rule("toFQDNs: []\ntoCIDR: []"),
                 ["spec.egress[0]: toCIDR and toFQDNs in one rule are not supported (as in Cilium); write one rule "
                  "for each",
                  f"spec.egress[0].toCIDR: {EMPTY_ALLOW}",
                  f"spec.egress[0].toFQDNs: {EMPTY_ALLOW}"], id="two-empty-peers"),
]


@pytest.mark.parametrize("text,messages", EMPTY_PEER_CASES)
def test_empty_peer_list_is_an_error(text: str, messages: list[str]) -> None:
    assert errors(text, "p.yaml") == [f"p.yaml: document 1: {m}" for m in messages]
    assert load.parse_text("p.yaml", text).policies == ()


META_KEYS = ("name, namespace, labels, annotations, generateName, uid, resourceVersion, generation, "
             "creationTimestamp, deletionTimestamp, deletionGracePeriodSeconds, ownerReferences, finalizers, "
             "managedFields, selfLink")
SPEC = "spec:\n  endpointSelector: {}\n  egress: [{toFQDNs: [{matchName: a.example}]}]\n"
CNP = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"

# metadata: Kubernetes ObjectMeta fields only, so a typo cannot move a policy to another namespace.
METADATA_CASES = [
    pytest.param("metadata: {name: web, namespce: prod}",
                 [f"metadata.namespce: unknown field (did you mean namespace?); allowed: {META_KEYS}"], id="typo"),
    pytest.param("metadata: {name: web, namespace: prod, owner: me, 'a b': 1}",
                 [f"metadata.owner: unknown field; allowed: {META_KEYS}",
                  f'metadata["a b"]: unknown field; allowed: {META_KEYS}'], id="unknown"),
    pytest.param("metadata: {namespace: prod}", ["metadata.name: is required"], id="no-name"),
    pytest.param("metadata: {name: 123, namespace: 2024}",
                 ["metadata.name: 123 is not a string; quote it",
                  "metadata.namespace: 2024 is not a string; quote it"], id="not-strings"),
    pytest.param("metadata: {name: web, namespace: Prod_1}",
                 ['metadata.namespace: "Prod_1" is not a valid namespace'], id="bad-namespace"),
    pytest.param("metadata: {name: web, labels: [app], annotations: team}",
                 ["metadata.labels: must be a mapping of strings to strings",
                  "metadata.annotations: must be a mapping of strings to strings"], id="not-maps"),
    pytest.param("metadata: {name: web, labels: {app: web, version: 2, 3: x}, annotations: {a.io/b: null}}",
                 ["metadata.labels.version: 2 is not a string; quote it",
                  "metadata.labels: key 3 is not a string; quote it",
                  'metadata.annotations["a.io/b"]: null is not a string; quote it'], id="not-string-values"),
]


@pytest.mark.parametrize("meta,messages", METADATA_CASES)
def test_metadata_fields_are_checked(meta: str, messages: list[str]) -> None:
    assert errors(CNP + meta + "\n" + SPEC, "p.yaml") == [f"p.yaml: document 1: {m}" for m in messages]


def test_full_object_metadata_loads() -> None:
    meta = """metadata:
  name: web
  namespace: prod
  labels: {app: web, "app.kubernetes.io/managed-by": helm}
  annotations: {"meta.helm.sh/release-name": web}
  uid: 4c1f9a3e-0000-4000-8000-000000000000
  resourceVersion: "12345"
  generation: 3
  creationTimestamp: "2024-01-01T00:00:00Z"
  managedFields: [{manager: kubectl, operation: Apply}]
  finalizers: []
  ownerReferences: []
"""
    report = load.parse_text("p.yaml", CNP + meta + SPEC)
    assert report.errors == () and [p.label for p in report.policies] == ["prod/web"]


EMPTY_DNS = ('enforces no DNS rule, so every name is allowed on these ports (as in Cilium: "if omitted or '
             'empty, no layer 7 rules are enforced"); write dns: [{matchPattern: "*"}] to allow every name, '
             "or list the names")
DNS_SERVER = "toEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\ntoPorts:\n- ports: [{port: '53'}]\n  "

# Empty rules.dns is Cilium's documented "no layer 7 rules": it loads (every name allowed), with a warning.
EMPTY_DNS_CASES = [
    pytest.param("rules: {dns: []}", "empty rules.dns",
                 [f"spec.egress[0].toPorts[0].rules.dns: an empty list {EMPTY_DNS}"], id="empty-list"),
    pytest.param("rules: {dns: null}", "empty rules.dns",
                 [f"spec.egress[0].toPorts[0].rules.dns: null {EMPTY_DNS}"], id="null"),
    pytest.param("rules: {}", "no rules.dns",
                 [f"spec.egress[0].toPorts[0].rules: an empty mapping {EMPTY_DNS}"], id="empty-rules"),
    pytest.param("rules: {dns: [{matchPattern: '*'}]}", "", [], id="explicit-star"),
]


@pytest.mark.parametrize("rules,reason,warnings", EMPTY_DNS_CASES)
def test_empty_dns_rules_load_with_a_warning(rules: str, reason: str, warnings: list[str]) -> None:
    from tests.policy.conftest import compile_policies

    text = rule(DNS_SERVER + rules)
    report = load.parse_text("p.yaml", text)
    assert report.errors == ()
    assert [str(w) for w in report.warnings] == [f"p.yaml: document 1: {w}" for w in warnings]
    compiled = compile_policies(text, "endpoints:\n- {namespace: shop, name: web, id: 1, ips: [192.0.2.1]}\n"
                                "- {namespace: kube-system, name: kube-dns, kind: service, "
                                "labels: {k8s-app: kube-dns}, ips: [192.0.2.53]}\n").for_id(1)
    decision = compiled.decide("192.0.2.53", 53, "UDP", "anything.example.")  # type: ignore[union-attr]
    assert decision.allowed
    if reason:
        assert decision.reason == f"allowed: {reason}, every name"


def test_yaml_syntax_error_reports_line() -> None:
    [message] = errors(VALID + "---\nspec: [\n", "p.yaml")
    # the problem text is libyaml's or PyYAML's, whichever is installed
    assert message.startswith("p.yaml: document 2: invalid YAML: line 10 column 1: ")


def test_invalid_document_loads_nothing_but_others_do() -> None:
    report = load.parse_text("p.yaml", VALID + "---\n" + rule("toServices: []"))
    assert len(report.policies) == 1 and len(report.errors) == 1
    with pytest.raises(load.PolicyError) as error:
        report.policy_set()
    assert error.value.problems == report.errors


def test_label_value_must_be_a_string() -> None:
    text = HEAD + "spec:\n  endpointSelector: {matchLabels: {version: 2}}\n"
    assert errors(text, "p.yaml") == [
        "p.yaml: document 1: spec.endpointSelector.matchLabels.version: 2 is not a string; quote it"]


def test_empty_egress_list_warns() -> None:
    report = load.parse_text("p.yaml", HEAD + "spec:\n  endpointSelector: {}\n  egress: []\n")
    assert [str(w) for w in report.warnings] == [
        "p.yaml: document 1: spec.egress: empty list: it does not make the endpoints default-deny (as in "
        "Cilium); write [{}] to deny all egress"]
    assert report.policies[0].has_egress_section is False


def test_directory_loading_and_duplicate_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(VALID)
    (tmp_path / "b.yml").write_text(VALID)
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".hidden.yaml").write_text("not yaml: [")
    report = load.check_paths([tmp_path])
    assert report.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))
    assert [str(e) for e in report.errors] == [
        f"{tmp_path / 'b.yml'}: document 1: metadata.name: CiliumNetworkPolicy shop/web is already defined in "
        f"{tmp_path / 'a.yaml'}: document 1; names are unique"]
    (tmp_path / "b.yml").write_text(VALID.replace("name: web", "name: web2"))
    policy_set = load.load_paths([tmp_path])
    assert [p.name for p in policy_set.policies] == ["web", "web2"]


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    report = load.check_paths([tmp_path / "missing.yaml"])
    assert len(report.errors) == 1
    assert str(report.errors[0]).startswith(f"{tmp_path / 'missing.yaml'}: cannot read:")


def test_inventory_beside_policies_is_checked_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(VALID)
    (tmp_path / "endpoints.yaml").write_text("endpoints:\n- {namespace: a, name: b, ips: [192.0.2.1]}\n")
    report = load.check_paths([tmp_path])
    assert report.errors == () and [p.label for p in report.policies] == ["shop/web"]
    assert [str(w) for w in report.warnings] == [
        f"{tmp_path / 'endpoints.yaml'}: an endpoint inventory, not policies: checked as one, loads no policy"]
    (tmp_path / "endpoints.yaml").write_text("endpoints:\n- {namespace: a, name: b, ips: [192.0.2.999]}\n")
    assert [str(e) for e in load.check_paths([tmp_path]).errors] == [
        f'{tmp_path / "endpoints.yaml"}: document 1: endpoints[0].ips[0]: "192.0.2.999" is not an IPv4 or IPv6 '
        "address"]


EMPTY_SET = "an empty policy set would stop enforcement for every endpoint"

# A directory that loads no policy at all is an error, at first load and on reload: it would
# turn enforcement off for every endpoint.
NO_POLICY_CASES = [
    pytest.param({}, f"no policies found: no policy files (*.yaml, *.yml); {EMPTY_SET}", id="no-files"),
    pytest.param({"notes.txt": "x", ".hidden.yaml": VALID},
                 f"no policies found: no policy files (*.yaml, *.yml); {EMPTY_SET}", id="no-policy-files"),
    pytest.param({"a.yaml": ""}, f"no policies found: 1 file holds no policy document; {EMPTY_SET}", id="empty-file"),
    pytest.param({"a.yaml": "---\n# nothing yet\n---\n", "b.yml": "endpoints:\n- {namespace: a, name: b, "
                  "ips: [192.0.2.1]}\n"},
                 f"no policies found: 2 files hold no policy document; {EMPTY_SET}", id="comments-and-inventory"),
]


@pytest.mark.parametrize("files,message", NO_POLICY_CASES)
def test_no_policies_found_is_an_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    report = load.check_paths([tmp_path])
    assert [str(e) for e in report.errors] == [f"{tmp_path}: {message}"]
    with pytest.raises(load.PolicyError, match="no policies found"):
        load.load_paths([tmp_path])


def test_no_policies_found_is_not_added_to_other_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(rule("toServices: []"))
    assert [str(e) for e in load.check_paths([tmp_path]).errors] == [
        f"{tmp_path / 'a.yaml'}: document 1: spec.egress[0].toServices: toServices is not supported: name the "
        "service's endpoints with toEndpoints or its addresses with toCIDR"]


def test_cilium_fixtures_load(cilium_fixtures: Path) -> None:
    report = load.check_paths([cilium_fixtures])
    assert report.errors == () and report.warnings == ()
    assert sorted(p.name for p in report.policies) == ["fqdn", "to-fqdn", "to-fqdn-short", "tofqdn-dns-visibility"]


def test_example_policies_load() -> None:
    from tests.policy.conftest import POLICIES

    report = load.check_paths([POLICIES])
    assert report.errors == ()
    assert sorted(p.label for p in report.policies) == [
        "ci/release-bot-github-only", "demo/backend", "demo/frontend", "lan/kids-school-only",
        "workstations-no-trackers"]
