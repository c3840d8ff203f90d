"""The engine: who is enforced, decide() on queries, select() for learned IPs, statics, changes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fqdnproxy import endpoints
from fqdnproxy.policy import engine, load, model
from tests.policy.conftest import POLICIES, compile_policies

DNS4, DNS6 = "198.51.100.53", "2001:db8:100::53"

INVENTORY = f"""\
endpoints:
  - {{namespace: default, name: mediabot, labels: {{org: empire, class: mediabot}}, ips: [198.51.100.1]}}
  - {{namespace: default, name: tiefighter, labels: {{org: empire, class: tiefighter}}, ips: [198.51.100.2]}}
  - {{namespace: default, name: test-app, labels: {{app: test-app}}, ips: [198.51.100.3]}}
  - {{namespace: default, name: other-app, labels: {{app: other}}, ips: [198.51.100.4]}}
  - {{namespace: default, name: xwing, labels: {{org: alliance}}, ips: [198.51.100.5]}}
  - {{namespace: elsewhere, name: test-app, labels: {{app: test-app, org: alliance}}, ips: [198.51.100.6]}}
  - {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}}, ips: [{DNS4}, "{DNS6}"]}}
"""
TCP443 = "TCP/443"
TCP80 = "TCP/80"
ALL = "ANY/all"

# (fixture file, endpoint, query, DNS allowed?, ports learned IPs get or None)
FIXTURE_CASES = [
    ("kubernetes-dns-port.yaml", "mediabot", "api.github.com", True, TCP443),
    ("kubernetes-dns-port.yaml", "mediabot", "github.com", True, None),
    ("kubernetes-dns-port.yaml", "mediabot", "a.b.github.com", True, None),
    ("kubernetes-dns-port.yaml", "mediabot", "example.com", True, None),
    ("kubernetes-dns-port.yaml", "tiefighter", "api.github.com", True, None),  # labels do not match
    ("kubernetes-dns-port.yaml", "test-app", "example.com", True, None),
    ("l3-fqdn.yaml", "test-app", "my-remote-service.com", True, ALL),
    ("l3-fqdn.yaml", "test-app", "MY-REMOTE-SERVICE.COM.", True, ALL),
    ("l3-fqdn.yaml", "test-app", "sub.my-remote-service.com", True, None),
    ("l3-fqdn.yaml", "other-app", "my-remote-service.com", True, None),
    ("l3-fqdn-short.yaml", "test-app", "kube-dns.kube-system.svc.cluster.local", True, None),
    ("l3-fqdn-short.yaml", "test-app", "cluster.local", False, None),
    ("l3-fqdn-short.yaml", "test-app", "docs.cilium.io", False, ALL),  # IPs allowed, query refused
    ("l3-fqdn-short.yaml", "test-app", "a.b.cilium.io", False, ALL),
    ("l3-fqdn-short.yaml", "test-app", "cilium.io", False, None),
    ("l3-fqdn-short.yaml", "mediabot", "cilium.io", True, None),
    ("l7-dns-dns.yaml", "xwing", "cilium.io", True, TCP80),
    ("l7-dns-dns.yaml", "xwing", "sub.cilium.io", True, TCP80),
    ("l7-dns-dns.yaml", "xwing", "www.cilium.io", True, None),
    ("l7-dns-dns.yaml", "xwing", "service1.api.cilium.io", True, TCP80),
    ("l7-dns-dns.yaml", "xwing", "special-x-service.api.cilium.io", True, TCP80),
    ("l7-dns-dns.yaml", "xwing", "service2.api.cilium.io", True, None),
    ("l7-dns-dns.yaml", "xwing", "a.b.cilium.io", False, None),
    ("l7-dns-dns.yaml", "xwing", "github.com", False, None),
    ("l7-dns-dns.yaml", "mediabot", "github.com", True, None),
]


@pytest.fixture
def inventory() -> endpoints.EndpointRegistry:
    return endpoints.parse_inventory("inv.yaml", INVENTORY)


def _policy(engine_: engine.PolicyEngine, name: str, namespace: str = "default") -> engine.EndpointPolicy:
    endpoint = engine_.registry.by_name(namespace, name)
    assert endpoint is not None
    return engine_.for_endpoint(endpoint)


@pytest.mark.parametrize("fixture,endpoint,query,dns_allowed,ports", FIXTURE_CASES)
def test_cilium_fixture(cilium_fixtures: Path, inventory: endpoints.EndpointRegistry, fixture: str,
                        endpoint: str, query: str, dns_allowed: bool, ports: str | None) -> None:
    compiled = _policy(engine.PolicyEngine(load.load_paths([cilium_fixtures / fixture]), inventory), endpoint)
    for server, protocol in ((DNS4, "UDP"), (DNS6, "TCP")):
        assert compiled.decide(server, 53, protocol, query).allowed is dns_allowed
    selected = compiled.select(query)
    assert (str(selected) if selected is not None else None) == ports


def test_fixture_endpoints_outside_the_namespace_are_not_selected(
        cilium_fixtures: Path, inventory: endpoints.EndpointRegistry) -> None:
    compiled = engine.PolicyEngine(load.load_paths([cilium_fixtures]), inventory)
    assert _policy(compiled, "test-app").enforced
    assert _policy(compiled, "xwing").enforced
    outsider = _policy(compiled, "test-app", "elsewhere")  # same labels, other namespace
    assert not outsider.enforced
    assert outsider.decide(DNS4, 53, "UDP", "my-remote-service.com.") == engine.Decision(
        True, None, "default allow: no egress policy selects this endpoint")
    assert outsider.select("my-remote-service.com.") is None


def test_fixture_queries_to_other_servers_and_ports_are_refused(
        cilium_fixtures: Path, inventory: endpoints.EndpointRegistry) -> None:
    compiled = _policy(engine.PolicyEngine(load.load_paths([cilium_fixtures / "l3-fqdn.yaml"]), inventory), "test-app")
    assert compiled.decide(DNS4, 53, "udp", "example.com.").allowed
    assert compiled.decide(f"::ffff:{DNS4}", 53, "udp", "example.com.").allowed
    assert compiled.decide("203.0.113.9", 53, "udp", "example.com.") == engine.Decision(False, None, "no rule allows")
    assert compiled.decide("198.51.100.1", 53, "udp", "example.com.").allowed is False  # a pod, not kube-dns
    assert compiled.decide(DNS4, 5353, "udp", "example.com.").allowed is False
    decision = compiled.decide(DNS4, 53, "udp", "example.com.")
    assert decision.rule == model.RuleRef(str(CILIUM := compiled.fqdn_rules[0][0].file), 1,
                                          "spec.egress[0].toPorts[0].rules.dns[0]", "default/to-fqdn")
    assert decision.reason == "allowed by rules.dns matchPattern: *"
    assert CILIUM.endswith("l3-fqdn.yaml")


INV = f"""\
endpoints:
  - {{namespace: demo, name: frontend, labels: {{app: frontend, "container:role": web}}, ips: [198.51.100.10, "2001:db8:100::10"]}}
  - {{namespace: demo, name: backend, labels: {{app: backend}}, ips: [198.51.100.11]}}
  - {{namespace: other, name: backend, labels: {{app: backend}}, ips: [198.51.100.12]}}
  - {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}}, ips: [{DNS4}]}}
"""
HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: demo}\n"
KUBE_DNS = ("- toEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system, "
            "'k8s:k8s-app': kube-dns}}]\n")


def frontend(spec: str, inventory: str = INV) -> engine.EndpointPolicy:
    compiled = compile_policies(HEAD + "spec:\n  endpointSelector: {matchLabels: {app: frontend}}\n" + spec, inventory)
    return _policy(compiled, "frontend", "demo")


def test_denies_win_over_allows() -> None:
    policy = frontend(f"""  egress:
  {KUBE_DNS}    toPorts: [{{ports: [{{port: '53'}}], rules: {{dns: [{{matchPattern: '*.demo.test'}}]}}}}]
  - toFQDNs: [{{matchPattern: '*.demo.test'}}]
  egressDeny:
  - toFQDNs: [{{matchName: blocked.demo.test}}]
""")
    assert policy.decide(DNS4, 53, "UDP", "api.demo.test.").allowed
    assert policy.select("api.demo.test.") == model.ALL_PORTS
    denied = policy.decide(DNS4, 53, "UDP", "Blocked.Demo.Test")
    assert denied == engine.Decision(False, model.RuleRef("p.yaml", 1, "spec.egressDeny[0].toFQDNs[0]", "demo/p"),
                                     "denied by egressDeny toFQDNs matchName: blocked.demo.test")
    assert policy.select("blocked.demo.test.") is None
    # The deny selector shares the toFQDNs matcher; it is never listed as selecting the name.
    assert policy.selecting("blocked.demo.test.") == (policy.fqdn_rules[0][0],)
    assert policy.deny_names[0][1].match_name == "blocked.demo.test"


def test_deny_cidr_covers_server_and_is_static() -> None:
    policy = frontend("""  egress:
  - toEntities: [all]
  egressDeny:
  - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.53/32]}]
    toPorts: [{ports: [{port: '53', protocol: UDP}]}]
""")
    decision = policy.decide("203.0.113.1", 53, "UDP", "a.example.")
    assert decision == engine.Decision(False, model.RuleRef("p.yaml", 1, "spec.egressDeny[0]", "demo/p"),
                                       "denied by egressDeny: 203.0.113.1 port 53/UDP is denied")
    assert policy.decide("203.0.113.1", 53, "TCP", "a.example.").allowed  # the deny is UDP only
    assert policy.decide("203.0.113.53", 53, "UDP", "a.example.").allowed  # except
    [deny] = policy.denies
    assert deny.networks == (ipaddress.ip_network("203.0.113.0/24"),)
    assert deny.excepts == (ipaddress.ip_network("203.0.113.53/32"),)
    assert str(deny.ports) == "UDP/53"


def test_enable_default_deny_false_keeps_default_allow_with_denies() -> None:
    policy = frontend("""  enableDefaultDeny: {egress: false}
  egressDeny:
  - toFQDNs: [{matchPattern: '**.ads.example'}]
""")
    assert policy.enforced
    assert policy.decide("203.0.113.1", 53, "UDP", "news.example.").allowed
    assert not policy.decide("203.0.113.1", 53, "UDP", "x.y.ads.example.").allowed
    assert policy.allows[0].networks == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert policy.allows[0].ref.path == "spec.enableDefaultDeny.egress"


def test_world_excludes_inventory_endpoints() -> None:
    policy = frontend("  egress:\n  - toEntities: [world]\n    toPorts: [{ports: [{port: '53'}]}]\n")
    assert policy.decide("203.0.113.1", 53, "UDP", "a.example.").allowed
    assert policy.decide("2001:db8:ffff::1", 53, "UDP", "a.example.").allowed
    assert not policy.decide(DNS4, 53, "UDP", "a.example.").allowed  # kube-dns is in the cluster
    assert not policy.decide("198.51.100.11", 53, "UDP", "a.example.").allowed
    [world] = policy.allows
    assert ipaddress.ip_network(f"{DNS4}/32") in world.excepts
    assert ipaddress.ip_network("2001:db8:100::10/128") in world.excepts
    v4_only = frontend("  egress:\n  - toEntities: [world-ipv4]\n")
    assert v4_only.decide("203.0.113.1", 53, "UDP", "a.").allowed
    assert not v4_only.decide("2001:db8:ffff::1", 53, "UDP", "a.").allowed
    assert all(e.version == 4 for e in v4_only.allows[0].excepts)


def test_cidr_set_except_and_l4_only_and_empty_rules() -> None:
    policy = frontend("""  egress:
  - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
    toPorts: [{ports: [{port: '53'}], rules: {dns: []}}]
""")
    assert policy.decide("203.0.113.1", 53, "UDP", "anything.example.") == engine.Decision(
        True, model.RuleRef("p.yaml", 1, "spec.egress[0].toPorts[0]", "demo/p"), "allowed: empty rules.dns, every name")
    assert not policy.decide("203.0.113.200", 53, "UDP", "anything.example.").allowed
    l4 = frontend("  egress:\n  - toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n")
    assert l4.decide("192.0.2.1", 53, "UDP", "x.").reason == "allowed: no rules.dns, every name"
    assert not l4.decide("192.0.2.1", 53, "TCP", "x.").allowed
    assert str(l4.allows[0].ports) == "UDP/53"
    empty = frontend("  egress:\n  - {}\n")
    assert empty.enforced and empty.allows == ()
    assert empty.decide(DNS4, 53, "UDP", "x.") == engine.Decision(False, None, "no rule allows")


def test_to_endpoints_is_scoped_to_the_policy_namespace() -> None:
    spec = "  egress:\n  - toEndpoints: [{matchLabels: {app: backend}}]\n"
    scoped = frontend(spec)
    [allow] = scoped.allows
    assert allow.networks == (ipaddress.ip_network("198.51.100.11/32"),)  # demo/backend, not other/backend
    assert scoped.decide("198.51.100.11", 53, "UDP", "x.").allowed
    assert not scoped.decide("198.51.100.12", 53, "UDP", "x.").allowed
    unscoped = frontend("  egress:\n  - toEndpoints: [{matchLabels: {app: backend}, matchExpressions: "
                        "[{key: 'k8s:io.kubernetes.pod.namespace', operator: Exists}]}]\n")
    assert unscoped.allows[0].networks == (ipaddress.ip_network("198.51.100.11/32"),
                                           ipaddress.ip_network("198.51.100.12/32"))
    # kube-dns is in kube-system: a selector without the namespace label misses it
    missing = frontend("  egress:\n  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]\n")
    assert missing.allows[0].networks == ()


def test_clusterwide_policy_selects_every_namespace() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  egress:
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]
"""
    compiled = compile_policies(text, INV)
    for namespace in ("demo", "other"):
        policy = _policy(compiled, "backend", namespace)
        assert policy.enforced and policy.decide(DNS4, 53, "UDP", "x.").allowed
    assert not _policy(compiled, "frontend", "demo").enforced


@pytest.mark.parametrize("selector,selected", [
    ("{matchLabels: {'k8s:app': frontend}}", True),
    ("{matchLabels: {'any:app': frontend}}", True),
    ("{matchLabels: {'container:app': frontend}}", False),
    ("{matchLabels: {'container:role': web}}", True),
    ("{matchLabels: {'k8s:role': web}}", False),
    ("{matchLabels: {role: web}}", True),
    ("{matchExpressions: [{key: app, operator: In, values: [frontend, api]}]}", True),
    ("{matchExpressions: [{key: app, operator: NotIn, values: [frontend]}]}", False),
    ("{matchExpressions: [{key: app, operator: NotIn, values: [backend]}]}", True),
    ("{matchExpressions: [{key: app, operator: Exists}]}", True),
    ("{matchExpressions: [{key: tier, operator: Exists}]}", False),
    ("{matchExpressions: [{key: tier, operator: DoesNotExist}]}", True),
    ("{matchLabels: {'k8s:io.kubernetes.pod.namespace': other}}", False),  # pinned to the policy's namespace
    ("{}", True),
])
def test_endpoint_selector_label_matching(selector: str, selected: bool) -> None:
    compiled = compile_policies(HEAD + f"spec:\n  endpointSelector: {selector}\n  egress: [{{}}]\n", INV)
    assert _policy(compiled, "frontend", "demo").enforced is selected
    assert not _policy(compiled, "backend", "other").enforced


def test_select_is_the_union_of_every_selecting_rule() -> None:
    policy = frontend("""  egress:
  - toFQDNs: [{matchPattern: '*.demo.test'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toFQDNs: [{matchName: api.demo.test}]
    toPorts: [{ports: [{port: '8000', endPort: 8080, protocol: TCP}, {port: '53', protocol: UDP}]}]
""")
    assert str(policy.select("api.demo.test")) == "TCP/443, TCP/8000-8080, UDP/53"
    assert str(policy.select("www.demo.test.")) == "TCP/443"
    assert policy.select("demo.test.") is None
    assert [r.path for r in policy.selecting("api.demo.test.")] == ["spec.egress[0].toFQDNs[0]",
                                                                   "spec.egress[1].toFQDNs[0]"]
    assert not policy.decide(DNS4, 53, "UDP", "api.demo.test.").allowed  # no DNS rule at all


DEMO_CASES = [
    ("frontend", "api.demo.test.", True, "TCP/80, TCP/443"),
    ("frontend", "www.demo.test.", True, "TCP/80, TCP/443"),
    ("frontend", "blocked.demo.test.", False, None),
    ("frontend", "a.b.demo.test.", False, None),
    ("frontend", "example.com.", False, None),
    ("backend", "db.demo.test.", True, "TCP/80, TCP/443"),
    ("backend", "api.demo.test.", False, None),
]


@pytest.mark.parametrize("name,query,allowed,ports", DEMO_CASES)
def test_demo_policy(name: str, query: str, allowed: bool, ports: str | None) -> None:
    registry = endpoints.load_inventory(POLICIES / "endpoints.demo.yaml")
    compiled = engine.PolicyEngine(load.load_paths([POLICIES / "demo.yaml"]), registry)
    policy = _policy(compiled, name, "demo")
    assert policy.enforced
    for server in ("198.51.100.53", "2001:db8:100::53"):
        assert policy.decide(server, 53, "UDP", query).allowed is allowed
    selected = policy.select(query)
    assert (str(selected) if selected else None) == ports


def test_example_policies() -> None:
    lan = engine.PolicyEngine(load.load_paths([POLICIES / "lan-gateway.yaml"]),
                              endpoints.load_inventory(POLICIES / "endpoints.lan.yaml"))
    kids = _policy(lan, "kids-laptop", "lan")
    assert kids.decide("192.0.2.1", 53, "UDP", "maths.school.example.").allowed
    assert not kids.decide("192.0.2.1", 53, "UDP", "games.example.").allowed
    assert str(kids.select("encyclopedia.example.")) == "TCP/443"
    assert not _policy(lan, "parents-desktop", "lan").enforced
    github = compile_policies((POLICIES / "github-only.yaml").read_text(), INV.replace("demo", "ci"))
    bot = engine.PolicyEngine(github.policy_set, endpoints.parse_inventory("i", INV.replace(
        "{app: frontend,", "{app: release-bot,").replace("namespace: demo, name: frontend", "namespace: ci, name: bot")))
    policy = _policy(bot, "bot", "ci")
    assert policy.decide(DNS4, 53, "UDP", "api.github.com.").allowed
    assert not policy.decide(DNS4, 53, "UDP", "github.com.").allowed
    assert str(policy.select("api.github.com.")) == "TCP/443"
    trackers = engine.PolicyEngine(load.load_paths([POLICIES / "deny-domains.yaml"]), endpoints.parse_inventory(
        "i", "endpoints:\n- {namespace: office, name: pc, labels: {role: workstation}, ips: [192.0.2.5]}\n"))
    pc = _policy(trackers, "pc", "office")
    assert pc.decide("192.0.2.1", 53, "UDP", "news.example.").allowed
    for name in ("doubleclick.net.", "a.b.doubleclick.net.", "x.tracker.example.", "ads.example.com."):
        assert not pc.decide("192.0.2.1", 53, "UDP", name).allowed, name


def test_changed_selections_and_endpoints() -> None:
    base = "  egress:\n  - toFQDNs: [{matchPattern: '*.demo.test'}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n"
    policy_text = HEAD + "spec:\n  endpointSelector: {matchLabels: {app: frontend}}\n"
    old = compile_policies(policy_text + base, INV)
    new = compile_policies(policy_text + base.replace("'443'", "'8443'") + "  - toFQDNs: [{matchName: new.example}]\n", INV)
    front = old.registry.by_name("demo", "frontend").id  # type: ignore[union-attr]
    back = old.registry.by_name("demo", "backend").id  # type: ignore[union-attr]
    changes = engine.changed_selections(old, new, {front: ["api.demo.test.", "new.example.", "gone.example."],
                                                   back: ["api.demo.test."], 424242: ["x."]})
    assert [(c.endpoint_id, c.name, str(c.before) if c.before else None, str(c.after) if c.after else None)
            for c in changes] == [
        (front, "api.demo.test.", "TCP/443", "TCP/8443"),
        (front, "new.example.", None, "ANY/all"),
    ]
    assert engine.changed_endpoints(old, new) == []  # selections changed, statics did not
    static = compile_policies(policy_text + base + "  - toCIDR: [192.0.2.0/24]\n", INV)
    assert engine.changed_endpoints(old, static) == [front]
    assert engine.changed_endpoints(old, old) == []
    assert engine.changed_selections(None, new, {front: ["new.example."]})[0].after == model.ALL_PORTS


def test_for_endpoint_compiles_unknown_endpoints() -> None:
    compiled = compile_policies(HEAD + "spec:\n  endpointSelector: {}\n  egress: [{}]\n", INV)
    stranger = endpoints.Endpoint(99, "demo", "stranger", {}, ("192.0.2.99",))
    assert compiled.for_id(99) is None
    assert compiled.for_endpoint(stranger).enforced
    assert {p.endpoint.name for p in compiled} == {"frontend", "backend"}  # workloads only
