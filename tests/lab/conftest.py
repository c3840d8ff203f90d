"""Fixtures for the lab's root tests (tier 4): a lab that is up for a whole module.

The lab's names are fixed (fqp-node, fqp-world, fqp-<pod>: the issue and the demo's commands
name them), so a fixture holds the lab lock (demo and tests take turns), first removes any lab
left by an earlier run and always removes its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from fqdnproxy.lab import lab as lab_mod
from tests.conftest import require


def require_lab_tools() -> None:
    """Skip (or, under CI=true, fail) unless root, knotd, dig and nft are there."""
    require(os.geteuid() == 0, "needs root (tier-4 test: namespaces, BPF, nftables)")
    for tool, package in (("knotd", "knot"), ("dig", "dnsutils"), ("nft", "nftables")):
        found = shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")
        require(bool(found), f"{tool} not installed (apt package {package}; `make bootstrap`)")


@pytest.fixture(scope="module")
def transparent_lab() -> Iterator[lab_mod.Lab]:
    """The demo lab (policies/demo.yaml, endpoints.demo.yaml) in transparent DNS mode."""
    require_lab_tools()
    require(lab_mod.transparent_available(), "this agent has no transparent mode")
    with lab_mod.exclusive():
        lab_mod.down(say=lambda _text: None)
        try:
            yield lab_mod.up(lab_mod.LabSettings(dns_mode="transparent"), say=lambda _text: None)
        finally:
            lab_mod.down(say=lambda _text: None)
