"""Root test: the loader dies by SIGKILL, a new one takes over; enforcement never lapses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fqdnproxy.datapath import attach as tc
from fqdnproxy.datapath import pinned
from fqdnproxy.datapath.allowmap import AllowEntry, PortRange
from fqdnproxy.datapath.maps import EndpointFlags
from tests.datapath import topology as topo

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def _loader(pin_dir: Path, bpffs: Path, net: topo.Topology) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("loader.py")), str(pin_dir), str(bpffs),
         net.node, net.pod1.host_if],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    return proc


def _program_ids(net: topo.Topology) -> list[int]:
    out = subprocess.run(["ip", "netns", "exec", net.node, "tc", "-j", "filter", "show", "dev",
                          net.pod1.host_if, "ingress"], capture_output=True, text=True, check=True)
    return [f["options"]["prog"]["id"] for f in json.loads(out.stdout) if "options" in f]


def test_sigkill_and_takeover_keep_enforcing(pin_dir: Path, bpffs: Path) -> None:
    with topo.topology() as net:
        first = _loader(pin_dir, bpffs, net)
        second = None
        session = loop = None
        try:
            with pinned.PinnedMaps.open(pin_dir) as m:
                for ip in (net.pod1.ip, net.pod1.ip6):
                    m.set_endpoint(ip, 1, EndpointFlags.ENFORCE_EGRESS, net.ifindex(net.pod1))
                m.upsert_allows([AllowEntry(1, "203.0.113.5/32", 0, (PortRange(6, 8080, 8080),))])
            program_before = _program_ids(net)

            session = subprocess.Popen(
                ["ip", "netns", "exec", net.pod1.ns, sys.executable, topo.PEER, "session",
                 "203.0.113.5", "8080"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert session.stdout.readline().strip() == "connected"
            loop = subprocess.Popen(
                ["ip", "netns", "exec", net.pod1.ns, sys.executable, topo.PEER, "loop", "6",
                 "tcp,203.0.113.5,8080", "tcp,203.0.113.6,8080", "udp,203.0.113.5,9000"],
                stdout=subprocess.PIPE, text=True)
            assert loop.stdout.readline().strip() == "started"

            first.send_signal(signal.SIGKILL)
            first.wait()
            session.stdin.write("ping\n")
            session.stdin.flush()
            assert session.stdout.readline().strip() == "ok"  # the filter still holds the program
            second = _loader(pin_dir, bpffs, net)  # reuses the pins, replaces the program
            program_after = _program_ids(net)
            assert len(program_before) == len(program_after) == 1 and program_after != program_before
            assert len(tc.attached(net.pod1.host_if, net.node)) == 1

            results = json.loads(loop.communicate(timeout=60)[0])
            allowed, denied, wrong_port = results.values()
            assert len(allowed) >= 10 and all(allowed)
            assert denied and not any(denied)
            assert wrong_port and not any(wrong_port)
            session.stdin.write("ping\n")
            session.stdin.flush()
            assert session.stdout.readline().strip() == "ok"
        finally:
            for proc in (first, second, session, loop):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
