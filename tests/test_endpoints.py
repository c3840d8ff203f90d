"""The endpoint inventory: parsing, lookups by IP/name/id, stable ids and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fqdnproxy import endpoints

INVENTORY = """\
endpoints:
  - namespace: demo
    name: frontend
    id: 10
    labels: {app: frontend}
    ips: [198.51.100.10, "2001:DB8:100:0::10"]
    interface: fqp-frontend-h
  - namespace: demo
    name: backend
    labels: {app: backend, "container:tier": db}
    ips: [198.51.100.11]
  - namespace: kube-system
    name: kube-dns
    kind: service
    labels: {k8s-app: kube-dns}
    ips: [198.51.100.53]
"""


@pytest.fixture
def registry() -> endpoints.EndpointRegistry:
    return endpoints.parse_inventory("inv.yaml", INVENTORY)


@pytest.mark.parametrize("ip,name", [
    ("198.51.100.10", "frontend"),
    ("2001:db8:100::10", "frontend"),
    ("2001:0db8:0100:0000:0000:0000:0000:0010", "frontend"),
    ("::ffff:198.51.100.11", "backend"),
    ("::ffff:c633:640b", "backend"),
    ("198.51.100.53", "kube-dns"),
    ("198.51.100.99", None),
    ("not-an-ip", None),
])
def test_by_ip_normalizes_addresses(registry: endpoints.EndpointRegistry, ip: str, name: str | None) -> None:
    found = registry.by_ip(ip)
    assert (found.name if found else None) == name


def test_lookups_and_fields(registry: endpoints.EndpointRegistry) -> None:
    frontend = registry.by_name("demo", "frontend")
    assert frontend is not None
    assert frontend.id == 10
    assert frontend.ips == ("198.51.100.10", "2001:db8:100::10")
    assert frontend.interface == "fqp-frontend-h"
    assert dict(frontend.labels) == {"app": "frontend"}
    assert registry.by_id(10) is frontend
    assert registry.by_name("demo", "nope") is None
    assert [ep.name for ep in registry] == ["frontend", "backend", "kube-dns"]
    assert [ep.name for ep in registry.workloads()] == ["frontend", "backend"]
    assert len(registry) == 3
    # Audit records name the endpoint by one dict, made once (the renderer remembers its JSON).
    assert frontend.identity == {"id": 10, "namespace": "demo", "name": "frontend",
                                 "labels": {"app": "frontend"}}
    assert frontend.identity is frontend.identity is registry.by_id(10).identity


def test_selector_labels_carry_source_and_namespace(registry: endpoints.EndpointRegistry) -> None:
    backend = registry.by_name("demo", "backend")
    assert backend is not None
    assert backend.selector_labels() == {
        ("k8s", "app"): "backend",
        ("container", "tier"): "db",
        ("k8s", "io.kubernetes.pod.namespace"): "demo",
    }


def test_ids_are_derived_stably_when_absent(registry: endpoints.EndpointRegistry) -> None:
    backend = registry.by_name("demo", "backend")
    assert backend is not None
    assert backend.id == endpoints.derived_id("demo", "backend")
    again = endpoints.parse_inventory("other.yaml", INVENTORY.replace("198.51.100.11", "198.51.100.12"))
    assert again.by_name("demo", "backend").id == backend.id  # type: ignore[union-attr]
    assert 1 << 16 <= backend.id < 2**31


def test_load_inventory_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(INVENTORY)
    assert len(endpoints.load_inventory(path)) == 3
    with pytest.raises(endpoints.EndpointsError, match="cannot read"):
        endpoints.load_inventory(tmp_path / "missing.yaml")


ENTRY = "  - {namespace: demo, name: a, ips: [198.51.100.1]}\n"


@pytest.mark.parametrize("body,problems", [
    (
        ENTRY + "  - {namespace: demo, name: b, ips: [198.51.100.2, 198.51.100.1]}\n",
        ["inv.yaml: document 1: endpoints[1].ips[1]: 198.51.100.1 is already the address of demo/a "
         "(document 1: endpoints[0]); each address belongs to one endpoint"],
    ),
    (
        ENTRY + "  - {namespace: demo, name: b, ips: ['::ffff:198.51.100.1']}\n",
        ["inv.yaml: document 1: endpoints[1].ips[0]: 198.51.100.1 is already the address of demo/a "
         "(document 1: endpoints[0]); each address belongs to one endpoint"],
    ),
    (
        ENTRY + "  - {namespace: demo, name: a, ips: [198.51.100.2]}\n",
        ["inv.yaml: document 1: endpoints[1]: demo/a is already defined at document 1: endpoints[0]; "
         "each namespace/name appears once"],
    ),
    (
        "  - {namespace: demo, name: a, id: 5, ips: [198.51.100.1]}\n"
        "  - {namespace: demo, name: b, id: 5, ips: [198.51.100.2]}\n",
        ["inv.yaml: document 1: endpoints[1].id: id 5 is already the id of demo/a (document 1: endpoints[0]); "
         "set a distinct id"],
    ),
    (
        "  - {namespace: demo, name: a, ips: [198.51.100.300], colour: red}\n",
        ["inv.yaml: document 1: endpoints[0].colour: unknown field; allowed: namespace, name, labels, ips, "
         "interface, id, kind",
         'inv.yaml: document 1: endpoints[0].ips[0]: "198.51.100.300" is not an IPv4 or IPv6 address'],
    ),
    (
        "  - {namespace: Demo, name: a, ips: []}\n",
        ['inv.yaml: document 1: endpoints[0].namespace: "Demo" is not a valid namespace; lowercase letters, '
         "digits, - and . are allowed (a Kubernetes name)",
         "inv.yaml: document 1: endpoints[0].ips: must be a non-empty list of IPv4 or IPv6 addresses"],
    ),
    (
        "  - {namespace: demo, name: a, ips: [198.51.100.1], labels: {version: 2, "
        "io.kubernetes.pod.namespace: x, 'reserved:host': ''}}\n",
        ["inv.yaml: document 1: endpoints[0].labels.version: 2 is not a string; quote it",
         "inv.yaml: document 1: endpoints[0].labels.io.kubernetes.pod.namespace: this label is derived "
         "from namespace; do not set it",
         'inv.yaml: document 1: endpoints[0].labels.reserved:host: label source "reserved" is not allowed; '
         "k8s, container, unspec (or none, meaning k8s)"],
    ),
    (
        "  - {namespace: demo, name: a, ips: [198.51.100.1], interface: a-very-long-interface, kind: pod, id: 0}\n",
        ['inv.yaml: document 1: endpoints[0].interface: "a-very-long-interface" is not an interface name; '
         "1 to 15 characters, no whitespace, / or :",
         'inv.yaml: document 1: endpoints[0].kind: "pod" is not allowed; workload or service',
         "inv.yaml: document 1: endpoints[0].id: 0 is not allowed; an integer from 1 to 4294967295"],
    ),
])
def test_inventory_errors_are_located(body: str, problems: list[str]) -> None:
    with pytest.raises(endpoints.EndpointsError) as error:
        endpoints.parse_inventory("inv.yaml", "endpoints:\n" + body)
    assert list(error.value.problems) == problems


@pytest.mark.parametrize("text,problem", [
    ("endpoints: [\n", "inv.yaml: invalid YAML: line 2 column 1: "),
    ("pods: []\n", "inv.yaml: document 1: unknown field 'pods'; an inventory document is a mapping with one "
                   "field, endpoints"),
    ("endpoints: {a: 1}\n", "inv.yaml: document 1: endpoints: must be a list of endpoints"),
])
def test_inventory_shape_errors(text: str, problem: str) -> None:
    with pytest.raises(endpoints.EndpointsError) as error:
        endpoints.parse_inventory("inv.yaml", text)
    [found] = error.value.problems
    assert found == problem or (problem.endswith(": ") and found.startswith(problem))


def test_registry_rejects_duplicates_built_in_code() -> None:
    a = endpoints.Endpoint(1, "demo", "a", {}, ("198.51.100.1",))
    b = endpoints.Endpoint(2, "demo", "b", {}, ("198.51.100.1",))
    with pytest.raises(endpoints.EndpointsError, match="198.51.100.1 is already the address of demo/a"):
        endpoints.EndpointRegistry([a, b])


def test_demo_inventory_loads() -> None:
    registry = endpoints.load_inventory(Path(__file__).parents[1] / "policies" / "endpoints.demo.yaml")
    frontend = registry.by_ip("198.51.100.10")
    assert frontend is not None and frontend.interface == "fqp-frontend-h"
    dns = registry.by_ip("2001:db8:100::53")
    assert dns is not None and dns.kind == "service" and dns.namespace == "kube-system"
