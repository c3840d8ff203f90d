"""After a kill -9, the new agent serves DNS before its own program is compiled: it learns into
the pinned maps, which the previous agent's program (still attached) reads, so what it releases
connects and nothing else does; then its program replaces the old one. And when that compile
fails, the agent says so and exits 3, and the old program keeps enforcing.

    pod1 --(lxc1)-- node [agent, transparent DNS, datapath on] --(wan0)-- world [knot, servers]

The compile is held by a gate (tests/datapath/gated_agent.py, ``Agent.program_gate``), never
mocked: real maps, real programs, real tc filters, real connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fqdnproxy.admin import client
from fqdnproxy.datapath.allowmap import kernel_now_ns
from tests.datapath.restart_world import (  # noqa: F401 (world: the fixture)
    INSTALLED, NEVER, World, dig, redirection, world)

pytestmark = pytest.mark.root

API, DB = "203.0.113.10", "203.0.113.11"  # api.demo.test, db.demo.test
GATED = ("-m", "tests.datapath.gated_agent")


def _readiness(world: World) -> dict[str, bool]:
    status = client.call(world.directory / "admin.sock", "status")
    return status["readiness"]  # type: ignore[no-any-return]


def _drop_records(world: World, destination: str) -> list[dict[str, object]]:
    records = [json.loads(line)
               for line in (world.directory / "audit.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("type") == "drop"
            and str(r.get("destination", {}).get("ip")) == destination]  # type: ignore[union-attr]


def test_dns_is_answered_and_learned_before_the_new_program_and_enforcement_never_lapses(
        world: World, tmp_path: Path) -> None:
    t = world.topology
    first = world.agent().start()
    try:
        assert dig(t.pod1, "api.demo.test") == ("NOERROR", [API])
        assert t.probe(t.pod1, f"tcp,{API},8080", f"tcp,{DB},8080", *NEVER) == [True] + [False] * 3
        old_program = world.program_ids()
        assert len(old_program) == 1
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    gate = tmp_path / "compile-gate"
    second = world.agent(entry=(*GATED, str(gate))).start()
    try:
        second.wait_for("compile gate: waiting")
        # Serving, over the pins, with the old program: not ready on the datapath's count.
        assert any("took over the maps pinned in" in line for line in second.log)
        assert _readiness(world) == {"policies": True, "datapath": False, "cache": True,
                                     "listeners": True}
        assert world.program_ids() == old_program

        # A name the first agent never resolved: answered, learned into the pinned map, and
        # the old program lets exactly that through.
        assert world.learned(DB) is None
        assert dig(t.pod1, "db.demo.test") == ("NOERROR", [DB])
        entry = world.learned(DB)
        assert entry is not None and entry.expiry_ns > kernel_now_ns()
        assert t.probe(t.pod1, f"tcp,{DB},8080", f"tcp,{API},8080", *NEVER) == \
            [True, True, False, False]
        assert world.program_ids() == old_program  # all of that before the new program

        gate.touch()
        second.wait_for("datapath: program compiled", timeout=120)
        new_program = world.program_ids()
        assert len(new_program) == 1 and new_program != old_program
        assert _readiness(world)["datapath"]
        # The new program reads the same maps: the same verdicts, and its drops are audited.
        assert t.probe(t.pod1, f"tcp,{DB},8080", f"tcp,{API},8080", *NEVER) == \
            [True, True, False, False]
        deadline = time.monotonic() + 10
        while not _drop_records(world, "203.0.113.1") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _drop_records(world, "203.0.113.1"), "no drop record from the new program"
    finally:
        gate.touch()
        status = second.stop()
    assert status == 0


def test_a_failed_compile_after_restart_stops_the_agent_and_the_old_program_keeps_enforcing(
        world: World, tmp_path: Path) -> None:
    t = world.topology
    first = world.agent().start()
    try:
        assert dig(t.pod1, "api.demo.test") == ("NOERROR", [API])
        old_program = world.program_ids()
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    # bcc cannot find kernel headers: a real compile failure, in the background this time.
    broken = subprocess.run(
        ["ip", "netns", "exec", t.node, sys.executable, "-m", "fqdnproxy", "run",
         *world.arguments()],
        env={**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path / "no-headers")},
        capture_output=True, text=True, timeout=120)
    log = broken.stdout + broken.stderr
    assert broken.returncode == 3, log
    assert "took over the maps pinned in" in log
    assert "datapath: cannot load this agent's program" in log and "no-headers" in log
    assert "could not start: datapath program:" in log

    # It left everything for its successor: the old program enforcing, the redirection.
    assert world.program_ids() == old_program
    assert redirection(t.node) == INSTALLED
    assert t.probe(t.pod1, f"tcp,{API},8080", *NEVER) == [True, False, False]

    # The supervisor's restart, with the toolchain fixed, takes over as after a kill.
    third = world.agent().start()
    try:
        third.wait_for("datapath: program compiled", timeout=120)
        assert world.program_ids() != old_program
        assert dig(t.pod1, "db.demo.test") == ("NOERROR", [DB])
        assert t.probe(t.pod1, f"tcp,{DB},8080", *NEVER) == [True, False, False]
    finally:
        status = third.stop()
    assert status == 0
