"""``fqdnproxy lab up|down|status`` (tier 4, root): what up builds, and that down leaves nothing.

Nothing may be left after ``down``: no ``fqp-`` namespace, no bpffs mount, no process the lab
started, no resolv.conf under /etc/netns, no state directory; and nothing may ever be added to
the network namespace the tests run in. ``down`` must also work after a crash (record lost,
agent killed) and twice in a row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.lab import demo, netns, scenario, topology
from fqdnproxy.lab import lab as lab_mod
from tests.lab.conftest import require_lab_tools

pytestmark = pytest.mark.root


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory of this test's own; any earlier lab is removed first and after."""
    require_lab_tools()
    with lab_mod.exclusive():
        lab_mod.down(say=lambda _text: None)
        directory = tmp_path / "lab"
        try:
            yield directory
        finally:
            lab_mod.down(directory, say=lambda _text: None)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fqdnproxy", "lab", *args], capture_output=True,
                          text=True, timeout=300)


def _root_netns() -> tuple[str, str]:
    """Links and addresses of the namespace the tests run in."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    addresses = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    return "\n".join(names), "\n".join(sorted(" ".join(line.split()[1:4])
                                              for line in addresses.splitlines()))


def _mounted_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path))]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_nothing_left(state_dir: Path, pids: list[int]) -> None:
    assert netns.names(topology.PREFIX) == []
    assert _mounted_under(state_dir) == []
    assert [pid for pid in pids if _alive(pid)] == []
    assert list(topology.RESOLV_DIR.glob(f"{topology.PREFIX}*")) == []
    assert not state_dir.exists()


def test_up_status_down_leaves_nothing(state_dir: Path) -> None:
    before = _root_netns()
    up = _cli("up", "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr + up.stdout
    assert "lab: up" in up.stdout

    status = _cli("status", "--state-dir", str(state_dir))
    assert status.returncode == 0, status.stdout
    assert "NOT" not in status.stdout and "MISSING" not in status.stdout
    record = json.loads((state_dir / lab_mod.STATE_FILE).read_text())
    pids = list(record["pids"].values())
    assert sorted(record["pids"]) == ["agent", "knot", "servers"]
    assert all(_alive(pid) for pid in pids)
    assert netns.names(topology.PREFIX) == ["fqp-backend", "fqp-frontend", "fqp-node", "fqp-world"]
    assert _mounted_under(state_dir) == [str(state_dir / "bpffs")]
    assert (state_dir / "bpffs" / "fqdnproxy").is_dir()
    assert _root_netns() == before  # nothing in the machine's namespace

    # The agent stops cleanly on down: its redirection table goes with a SIGTERM.
    down = _cli("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert "removed namespace fqp-node" in down.stdout
    _assert_nothing_left(state_dir, pids)
    assert _root_netns() == before

    again = _cli("down", "--state-dir", str(state_dir))
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    gone = _cli("status", "--state-dir", str(state_dir))
    assert gone.returncode == 1 and "lab: down" in gone.stdout


def test_down_after_a_crash_with_the_record_lost(state_dir: Path) -> None:
    lab = lab_mod.up(lab_mod.LabSettings(state_dir=state_dir), say=lambda _text: None)
    pids = list(lab.pids.values())
    os.kill(lab.pids["agent"], signal.SIGKILL)  # no clean stop: tc, pins, nftables stay
    (state_dir / lab_mod.STATE_FILE).unlink()  # and nobody knows the pids any more
    assert lab_mod.status(state_dir).up is False
    assert "left over" in "\n".join(lab_mod.status(state_dir).lines)
    removed = lab_mod.down(state_dir, say=lambda _text: None)
    assert any(line.startswith("process") for line in removed)  # found by namespace
    _assert_nothing_left(state_dir, pids)


def test_up_refuses_over_leftovers_and_down_removes_them(state_dir: Path) -> None:
    netns.create(topology.NODE)
    with pytest.raises(lab_mod.LabError, match="lab down"):
        lab_mod.up(lab_mod.LabSettings(state_dir=state_dir), say=lambda _text: None)
    assert lab_mod.down(state_dir, say=lambda _text: None) == [f"namespace {topology.NODE}"]
    _assert_nothing_left(state_dir, [])


def test_a_failed_up_removes_what_it_made(state_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nspec: {egress: 3}\n")
    with pytest.raises(FqdnproxyError, match="exited"):
        lab_mod.up(lab_mod.LabSettings(state_dir=state_dir, policies=bad),
                   say=lambda _text: None)
    _assert_nothing_left(state_dir, [])


def test_explicit_mode_plays_the_same_scenario(state_dir: Path) -> None:
    """Explicit mode: the node holds kube-dns's addresses and the agent listens on them."""
    lab = lab_mod.up(lab_mod.LabSettings(dns_mode="explicit", state_dir=state_dir),
                     say=lambda _text: None)
    results = scenario.run(lab, 4)
    assert [(r.number, r.actual) for r in results if not r.ok] == []
    records = demo.read_audit(lab.audit_path, results)
    upstreams = {ip for ip, _ in topology.WORLD_TRANSIT}  # upstream.servers, in turn
    answers = [r for r in records if r["type"] == "answer"]
    assert answers and all(r["server"]["ip"] in upstreams for r in answers)
