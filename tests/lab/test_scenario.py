"""The demo scenario, asserted end to end over IPv4 and IPv6 (tier 4, root).

Pods ask kube-dns's address (the world's knot); the node redirects the query to the agent
(transparent mode), which decides, forwards to the server asked, learns into the kernel map and
answers as that server. Every step of scenario.py must go as expected, and every lookup must
leave the audit record that explains it.
"""

from __future__ import annotations

import pytest

from fqdnproxy.lab import client, scenario, topology
from fqdnproxy.lab import lab as lab_mod
from tests.support.audit_schema import validate

pytestmark = pytest.mark.root


def _audit(lab: lab_mod.Lab, results: list[scenario.Result]) -> list[dict[str, object]]:
    from fqdnproxy.lab import demo

    return demo.read_audit(lab.audit_path, results)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_demo_scenario(transparent_lab: lab_mod.Lab, family: int) -> None:
    lab = transparent_lab
    results = scenario.run(lab, family)
    table = "\n".join(f"{r.number} {r.pod} {r.action}: expected {r.expected!r}, got {r.actual!r}"
                      for r in results)
    assert [r.number for r in results if not r.ok] == [], table
    assert len(results) == 12

    records = _audit(lab, results)
    server = lab.plan.dns_server(family)
    for result in results:
        if result.query is None:
            continue
        found = scenario.records_for(result, records)
        assert len(found) == 1, (result, found)
        record = found[0]
        validate(record)
        assert record["endpoint"]["name"] == result.pod
        # Transparent: forwarded to the server the pod asked, and answered as it.
        assert record["server"] == {"ip": server, "port": 53}
        if result.expected.startswith("NOERROR"):
            ip = result.expected.split()[1]
            assert record["verdict"] == "allowed" and record["rcode"] == "NOERROR"
            assert [a["ip"] for a in record["allowed"]] == [ip]
            assert "tcp/443" in record["allowed"][0]["ports"]
        else:
            assert record["verdict"] == "denied" and record["rcode"] == "REFUSED"
            assert record["allowed"] == []
    blocked = next(r for r in results if r.query == ("blocked.demo.test.", scenario.QTYPE[family]))
    assert "egressDeny" in scenario.records_for(blocked, records)[0]["reason"]
    no_rule = next(r for r in results if r.pod == "backend" and r.expected == "REFUSED")
    assert scenario.records_for(no_rule, records)[0]["reason"] == "no rule allows"


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_servers_answer_and_the_policy_opens_tcp_only(transparent_lab: lab_mod.Lab,
                                                          family: int) -> None:
    lab = transparent_lab
    api = scenario.ADDRESSES[family]["api"]
    assert client.udp(topology.NODE, api, 443)  # the node is no endpoint: the server is up
    frontend = lab.plan.pod("frontend")
    server = lab.plan.dns_server(family)
    lookup = client.dig(frontend.namespace, "api.demo.test", scenario.QTYPE[family], server)
    assert lookup.data(scenario.QTYPE[family]) == [api]
    assert client.connect(frontend.namespace, api, 80)[0]  # TCP 80 and 443 are open
    assert not client.udp(frontend.namespace, api, 443)  # UDP is not
    assert not client.connect(frontend.namespace, api, 853)[0]


def test_pods_resolver_is_kube_dns_in_the_world(transparent_lab: lab_mod.Lab) -> None:
    """``ip netns exec fqp-frontend dig api.demo.test`` works with no @server: resolv.conf."""
    frontend = transparent_lab.plan.pod("frontend")
    lookup = client.dig(frontend.namespace, "www.demo.test", "A")
    assert lookup.status == "NOERROR"
    assert lookup.data("CNAME") == ["web.demo.test.", "api.demo.test."]
    assert lookup.data("A") == [scenario.ADDRESSES[4]["api"]]
    conf = (topology.RESOLV_DIR / frontend.namespace / "resolv.conf").read_text()
    assert [line.split()[1] for line in conf.splitlines() if line.startswith("nameserver")] == \
        list(transparent_lab.plan.dns_servers)

