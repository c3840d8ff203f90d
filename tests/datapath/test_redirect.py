"""datapath/redirect.py: the TPROXY ruleset, and installing it idempotently in a namespace."""

from __future__ import annotations

import sys

import pytest

from fqdnproxy.datapath import redirect
from tests.support import netns


def test_ruleset_replaces_the_table_in_one_transaction() -> None:
    script = redirect.Redirect(("lxc2", "lxc1"), 15353).ruleset()
    lines = script.splitlines()
    assert lines[:3] == ["table inet fqdnproxy {}", "delete table inet fqdnproxy",
                         "table inet fqdnproxy {"]
    assert 'iifname { "lxc1", "lxc2" } meta l4proto { udp, tcp } th dport 53' in script
    assert "tproxy ip to 127.0.0.1:15353" in script and "tproxy ip6 to [::1]:15353" in script


def test_no_interfaces_means_an_empty_chain() -> None:
    assert "tproxy" not in redirect.Redirect((), 15353).ruleset()


INSTALL = """
from fqdnproxy.datapath import redirect
rules = redirect.Redirect(("lxc1",), 15353)
redirect.install(rules); redirect.install(rules)  # idempotent
print("installed" if redirect.installed() else "missing")
"""
REMOVE = """
from fqdnproxy.datapath import redirect
redirect.remove(); redirect.remove()  # idempotent
print("installed" if redirect.installed() else "missing")
"""


@pytest.mark.root
def test_install_and_remove_in_a_namespace() -> None:
    with netns.namespace() as ns:
        netns.run(ns, "ip", "link", "set", "lo", "up")
        assert netns.run(ns, sys.executable, "-c", INSTALL).stdout.strip() == "installed"
        assert netns.run(ns, "ip", "rule").stdout.count("0x1d53") == 1
        assert netns.run(ns, "ip", "-6", "rule").stdout.count("0x1d53") == 1
        assert "local default dev lo" in netns.run(ns, "ip", "route", "show", "table", "153").stdout
        assert netns.run(ns, sys.executable, "-c", REMOVE).stdout.strip() == "missing"
        assert "0x1d53" not in netns.run(ns, "ip", "rule").stdout
        assert "0x1d53" not in netns.run(ns, "ip", "-6", "rule").stdout
        assert netns.run(ns, "nft", "list", "tables").stdout.strip() == ""
