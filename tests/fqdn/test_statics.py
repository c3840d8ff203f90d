"""fqdn/statics.py: the prefix tables agree with the rules' own ``covers`` on every address."""

from __future__ import annotations

import ipaddress

import pytest

from fqdnproxy.datapath import portmath
from fqdnproxy.fqdn.statics import StaticIndex
from fqdnproxy.policy import model
from fqdnproxy.policy.engine import StaticRule

REF = model.RuleRef("p.yaml", 0, "spec.egress[0]", "p")


def _rule(networks: list[str], ports: str, excepts: tuple[str, ...] = ()) -> StaticRule:
    protocol, _, port = ports.partition("/")
    first, _, last = port.partition("-")
    port_set = model.PortSet.of([model.PortRange(protocol, int(first), int(last or first))])
    return StaticRule(REF, tuple(ipaddress.ip_network(n) for n in networks), port_set,
                      tuple(ipaddress.ip_network(n) for n in excepts))


ALLOWS = (
    _rule(["192.0.2.0/24", "192.0.2.0/25"], "TCP/8080"),  # two networks of one rule: counted once
    _rule(["0.0.0.0/0", "::/0"], "UDP/53", excepts=("192.0.2.128/26", "2001:db8:1::/48")),
    _rule(["192.0.2.7/32", "2001:db8::7/128"], "TCP/22"),
)
DENIES = (
    _rule(["192.0.2.0/28"], "TCP/8080"),
    _rule(["2001:db8::/32"], "ANY/0-65535"),
)


def _naive(address: str) -> tuple[tuple, tuple, bool]:
    """What learner.py computed before the index: a loop over the rules' networks."""
    ip = ipaddress.ip_address(address)
    exact = ipaddress.ip_network(ip)
    allowed: tuple = ()
    denied: tuple = ()
    static = False
    for rules, deny in ((ALLOWS, False), (DENIES, True)):
        for rule in rules:
            if rule.covers(ip):
                if deny:
                    denied += portmath.from_policy(rule.ports)
                else:
                    allowed += portmath.from_policy(rule.ports)
                static = static or exact in rule.networks
    return allowed, denied, static


@pytest.mark.parametrize("address", [
    "192.0.2.1", "192.0.2.7", "192.0.2.20", "192.0.2.130", "192.0.2.200", "198.51.100.1",
    "0.0.0.0", "255.255.255.255", "2001:db8::7", "2001:db8::8", "2001:db8:1::1", "2001:db9::1",
    "::", "::ffff:192.0.2.7",
])
def test_cover_agrees_with_the_rules(address: str) -> None:
    index = StaticIndex(ALLOWS, DENIES, portmath.from_policy)
    ip = ipaddress.ip_address(address)
    assert index.cover(ip.version, int(ip)) == _naive(address)


def test_no_rules_for_a_family_costs_nothing() -> None:
    index = StaticIndex((_rule(["192.0.2.0/24"], "TCP/443"),), (), portmath.from_policy)
    assert index.cover(6, int(ipaddress.ip_address("2001:db8::1"))) == ((), (), False)


def test_covered_keys_holds_every_address_a_rule_covers() -> None:
    """Sound for the learn stage's fast lane: a key left out is covered by no rule at all."""
    from fqdnproxy import ipkey

    index = StaticIndex(ALLOWS, DENIES, portmath.from_policy)
    addresses = ["192.0.2.1", "192.0.2.7", "192.0.2.20", "192.0.2.130", "192.0.2.200",
                 "198.51.100.1", "0.0.0.0", "2001:db8::7", "2001:db8:1::1", "2001:db9::1", "::",
                 "::ffff:192.0.2.7"]
    keys = {ipkey.key(a): a for a in addresses}
    covered = index.covered_keys(keys)
    for k, address in keys.items():
        if index.cover(*ipkey.split(k)) != ((), (), False):
            assert k in covered, address
    narrow = StaticIndex((_rule(["192.0.2.0/25"], "TCP/80"),), (_rule(["2001:db8::/32"], "TCP/80"),),
                         portmath.from_policy)
    assert {keys[k] for k in narrow.covered_keys(keys)} == {
        "192.0.2.1", "192.0.2.7", "192.0.2.20", "2001:db8::7", "2001:db8:1::1"}
    assert StaticIndex((), (), portmath.from_policy).covered_keys(keys) == set()
