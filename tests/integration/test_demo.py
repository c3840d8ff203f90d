"""``make demo`` (tier 4, root): the lab is built, every scripted step goes as expected over
IPv4 and IPv6, the table and the matching audit records are printed, and nothing is left."""

from __future__ import annotations

import pytest

from fqdnproxy.lab import demo, netns, topology
from fqdnproxy.lab import lab as lab_mod
from tests.lab.conftest import require_lab_tools

pytestmark = pytest.mark.root


def test_demo_passes_prints_the_table_and_audit_and_cleans_up(
        capsys: pytest.CaptureFixture[str]) -> None:
    require_lab_tools()
    try:
        assert demo.main([]) == 0  # takes the lab lock itself
    finally:
        with lab_mod.exclusive():
            lab_mod.down(say=lambda _text: None)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.strip().endswith((" yes", " NO"))]
    assert len(table) == 24 and all(line.endswith(" yes") for line in table), out
    for expected in ("dig blocked.demo.test A", "REFUSED", "dropped", "after 2 s TTL",
                     "(backend's answer)", '"name": "api.demo.test."', "reason: no rule allows",
                     "egressDeny", "Demo passed"):
        assert expected in out, expected
    assert netns.names(topology.PREFIX) == [] and not lab_mod.STATE_DIR.exists()


def test_demo_keep_leaves_the_lab_up_with_commands_to_try(
        capsys: pytest.CaptureFixture[str]) -> None:
    require_lab_tools()
    with lab_mod.exclusive():
        try:
            assert demo.run_demo(lab_mod.LabSettings(), (4,), keep=True)
            out = capsys.readouterr().out
            assert "ip netns exec fqp-frontend dig api.demo.test" in out
            assert lab_mod.status().up
        finally:
            lab_mod.down(say=lambda _text: None)
        assert netns.names(topology.PREFIX) == []
