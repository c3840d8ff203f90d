"""Root test: the loader dies by SIGKILL, a new one takes over; enforcement never lapses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fqdnproxy.datapath import attach as tc
from fqdnproxy.datapath import egress, pinned
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


def test_open_takes_the_pins_over_at_once_and_load_program_replaces_the_old_program(
        pin_dir: Path, bpffs: Path) -> None:
    """What a restarted agent does: write into the pins while the old program enforces from
    them, compile later, then replace it on every interface asked for meanwhile."""
    assert egress.EgressDatapath.open(pin_dir, bpffs=bpffs) is None  # nothing pinned: load()
    with topo.topology() as net:
        first = _loader(pin_dir, bpffs, net)
        dp = None
        try:
            with pinned.PinnedMaps.open(pin_dir) as m:
                m.set_endpoint(net.pod1.ip, 1, EndpointFlags.ENFORCE_EGRESS, net.ifindex(net.pod1))
            first.send_signal(signal.SIGKILL)
            first.wait()
            old = _program_ids(net)

            dp = egress.EgressDatapath.open(pin_dir, bpffs=bpffs)
            assert dp is not None and not dp.program_loaded
            with pytest.raises(egress.DatapathError):
                dp.prog_fd
            assert dp.attach(net.pod1.host_if, netns=net.node) == 0  # remembered for later
            dp.attach("fqp-gone0", netns=net.node)  # not there by then: skipped, not an error
            dp.upsert_allows([AllowEntry(1, "203.0.113.6/32", 0, (PortRange(6, 8080, 8080),))])
            # The old program reads what was just written; nothing else passes.
            assert net.probe(net.pod1, "tcp,203.0.113.6,8080", "tcp,203.0.113.7,8080") == \
                [True, False]
            assert _program_ids(net) == old

            # A load cancelled while it compiles (a handover) attaches nothing.
            other = egress.EgressDatapath.open(pin_dir, bpffs=bpffs)
            assert other is not None
            other.attach(net.pod1.host_if, netns=net.node)
            outcome: list[BaseException] = []
            compiling = threading.Thread(target=lambda: _catch(other.load_program, outcome))
            compiling.start()
            other.cancel_load()
            compiling.join()
            other.close()
            assert isinstance(outcome[0], egress.DatapathError) and _program_ids(net) == old

            assert dp.load_program() == [net.pod1.host_if]
            new = _program_ids(net)
            assert len(new) == 1 and new != old and dp.program_loaded
            assert net.probe(net.pod1, "tcp,203.0.113.6,8080", "tcp,203.0.113.7,8080") == \
                [True, False]
            assert dp.attach(net.pod2.host_if, netns=net.node) == net.ifindex(net.pod2)  # at once
            with pytest.raises(egress.DatapathError):
                dp.load_program()  # once per instance
        finally:
            if dp is not None:
                dp.close()
            if first.poll() is None:
                first.kill()
                first.wait()


def _catch(call: Callable[[], object], into: list[BaseException]) -> None:
    try:
        call()
    except BaseException as error:  # the outcome is the test's to judge
        into.append(error)
