"""``kill -9`` of the agent under load, with the datapath enforcing and the pod's DNS redirected
(transparent mode), then a new agent on the same pinned maps and state directory.

    pod1 --(lxc1)-- node [fqdnproxy run --dns-mode transparent, datapath on] --(wan0)-- world
    load in pod1:   DNS for api, db, dual.demo.test to 203.0.113.9:53 at QPS q/s (redirected)
                    a new TCP connection after another to each released IP (203.0.113.10-12:8080)
                    the same to what was never released (203.0.113.1:8080, 203.0.113.10:8081)
                    one TCP connection opened before the kill, pinged every 0.1 s

While no agent runs, the tc program and the pinned maps go on enforcing, and the nftables table
and policy-routing rules stay (a SIGKILL runs no cleanup): DNS is redirected to a port where
nothing listens, so it fails at once (port unreachable) until the new agent binds it. The new
agent finds the pins, so it serves DNS before it has compiled its own program (the old one
enforces from the maps it learns into meanwhile) and replaces the program once compiled. The DNS
gap (kill to the first answer of the new agent) and the queries lost are measured and printed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.datapath import topology as topo
from tests.datapath.restart_world import (  # noqa: F401 (world: the fixture)
    DNS4, INSTALLED, NAMES, NEVER, RELEASED, World, dig, redirection, world)
from tests.support.audit_schema import validate

pytestmark = pytest.mark.root

HOLD = "hold,203.0.113.10,8080"
QPS = 200
# s: answers must resume within this. The new agent serves DNS over the pinned maps before its
# own program is compiled (seconds of bcc), so its start is about a second; generous for CI.
GAP_BOUND = 10.0


def test_kill_9_under_load_loses_nothing_allowed_and_the_dns_gap_is_measured(
        world: World) -> None:
    t = world.topology

    agent = world.agent().start()
    load: subprocess.Popen[str] | None = None
    try:
        for name, ip in zip(NAMES, RELEASED):
            assert dig(t.pod1, name) == ("NOERROR", [ip])
        allowed = [f"tcp,{ip},8080" for ip in RELEASED]
        assert t.probe(t.pod1, *allowed, *NEVER) == [True] * 3 + [False] * 2
        assert redirection(t.node) == INSTALLED and len(world.program_ids()) == 1

        load = subprocess.Popen(
            ["ip", "netns", "exec", t.pod1.ns, sys.executable, topo.PEER, "load",
             ",".join((DNS4, *NAMES)), str(QPS), HOLD, *allowed, *NEVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None and load.stdout.readline().strip() == "started"
        time.sleep(2)  # the load runs against the first agent

        killed = time.monotonic()
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        # No agent: nothing was cleaned up, nothing needs to be.
        assert redirection(t.node) == INSTALLED and len(world.program_ids()) == 1
        old_program = world.program_ids()
        agent = world.agent().start()
        ready = time.monotonic()
        agent.wait_for("datapath: program compiled", timeout=120)
        compiled = time.monotonic()
        # The new agent replaced, not added: one table, one rule per family, one filter, whose
        # program is the new agent's now.
        assert redirection(t.node) == INSTALLED and len(world.program_ids()) == 1
        assert world.program_ids() != old_program
        time.sleep(2)  # and against the new one

        assert load.stdin is not None
        out, _ = load.communicate("stop\n", timeout=60)
        assert load.returncode == 0
        report = json.loads(out)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        status = agent.stop()
    assert status == 0
    assert redirection(t.node)["table"] == 0  # a clean stop removes the redirection

    sent = {ident: at for at, ident in report["sent"]}
    answered = {int(ident): (at, rcode) for ident, (at, rcode) in report["answered"].items()}
    after_kill = sorted(at for at, _ in answered.values() if at > killed)
    assert after_kill, "no DNS answer after the kill"
    gap = after_kill[0] - killed
    lost = [ident for ident in sent if ident not in answered]
    lost_in_gap = [ident for ident in lost if killed <= sent[ident] <= after_kill[0]]
    lost_before = [ident for ident in lost if sent[ident] < killed]  # in flight at the kill
    probes = report["probes"]
    in_gap = {spec: [ok for at, ok in probes[spec] if killed <= at <= after_kill[0]]
              for spec in probes}
    # The old program enforced from the kill until the new agent's replaced it: no agent at
    # first, then the new agent serving DNS and learning into the maps while it compiled.
    during = {spec: [ok for at, ok in probes[spec] if killed <= at <= compiled]
              for spec in probes}
    tried = sum(len(probes[spec]) for spec in allowed)
    print(f"\nkill -9 under load (transparent DNS, datapath enforcing): DNS gap {gap:.2f} s "
          f"(kill to the new agent's first answer; its start took {ready - killed:.2f} s, its "
          f"program replaced the old one {compiled - killed:.2f} s after the kill), "
          f"{len(lost)} of {len(sent)} queries lost at {QPS} q/s ({len(lost_in_gap)} sent in "
          f"the gap, {len(lost_before)} before the kill, "
          f"{len(lost) - len(lost_in_gap) - len(lost_before)} after the gap); "
          f"new connections to released IPs: "
          f"{sum(ok for spec in allowed for _, ok in probes[spec])} of {tried} succeeded "
          f"({sum(len(in_gap[spec]) for spec in allowed)} in the DNS gap, "
          f"{sum(len(during[spec]) for spec in allowed)} before the new program replaced the "
          f"old); to never-released: "
          f"{sum(ok for spec in NEVER for _, ok in probes[spec])} of "
          f"{sum(len(probes[spec]) for spec in NEVER)}; the connection held across the kill: "
          f"{sum(ok for _, ok in probes[HOLD])} of {len(probes[HOLD])} pings answered")

    # DNS: answered before the kill, refused while no agent runs, answered again in time.
    assert gap < GAP_BOUND
    assert all(rcode == 0 for _, rcode in answered.values())
    answered_after = [i for i in sent if sent[i] > ready + 0.5]
    assert len([i for i in answered_after if i in answered]) >= 0.9 * len(answered_after)
    # Nothing allowed is lost: every new connection to a released IP, before, during and after
    # the gap, and every ping on the connection held across it.
    for spec in (*allowed, HOLD):
        assert probes[spec] and all(ok for _, ok in probes[spec]), spec
        assert during[spec], f"{spec}: nothing tried while the old program enforced"
    # Nothing allowed that was not: never-released IPs and ports stay dropped throughout.
    for spec in NEVER:
        assert during[spec] and not any(ok for _, ok in probes[spec]), spec
    for line in (world.directory / "audit.jsonl").read_text().splitlines():
        validate(json.loads(line))
