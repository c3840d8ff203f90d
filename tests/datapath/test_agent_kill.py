"""``kill -9`` of the agent under load, with the datapath enforcing and the pod's DNS redirected
(transparent mode), then a new agent on the same pinned maps and state directory.

    pod1 --(lxc1)-- node [fqdnproxy run --dns-mode transparent, datapath on] --(wan0)-- world
    load in pod1:   DNS for api, db, dual.demo.test to 203.0.113.9:53 at QPS q/s (redirected)
                    a new TCP connection after another to each released IP (203.0.113.10-12:8080)
                    the same to what was never released (203.0.113.1:8080, 203.0.113.10:8081)
                    one TCP connection opened before the kill, pinged every 0.1 s

While no agent runs, the tc program and the pinned maps go on enforcing, and the nftables table
and policy-routing rules stay (a SIGKILL runs no cleanup): DNS is redirected to a port where
nothing listens, so it fails at once (port unreachable) until the new agent binds it. The DNS gap
(kill to the first answer of the new agent) and the queries lost are measured and printed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fqdnproxy.datapath import attach
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.conftest import require
from tests.datapath import topology as topo
from tests.support import netns
from tests.support.audit_schema import validate
from tests.support.policies import web_policy

pytestmark = pytest.mark.root

DNS4 = "203.0.113.9"
NAMES = ("api.demo.test", "db.demo.test", "dual.demo.test")
RELEASED = ("203.0.113.10", "203.0.113.11", "203.0.113.12")  # what NAMES resolve to
EXTRA_WORLD = ("203.0.113.11", "203.0.113.12")  # not in the topology's world: added here
NEVER = ("tcp,203.0.113.1,8080", "tcp,203.0.113.10,8081")  # never resolved; a port not allowed
HOLD = "hold,203.0.113.10,8080"
QPS = 200
GAP_BOUND = 60.0  # s: answers must resume within this (bcc compiles the program at start)

POLICY = web_policy(['matchPattern: "*.demo.test"'], [f"matchName: {n}" for n in NAMES],
                    fqdn_port=8080)

INVENTORY = f"""\
endpoints:
  - {{namespace: demo, name: pod1, id: 1, labels: {{app: web}}, ips: ["192.0.2.10"],
     interface: lxc1}}
  - {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}},
     ips: ["{DNS4}"]}}
"""


@dataclass(frozen=True)
class World:
    topology: topo.Topology
    directory: Path
    pin_dir: Path

    def agent(self) -> AgentProcess:
        """An agent on the same pins, state directory and admin socket every time."""
        d = self.directory
        return AgentProcess([
            "--dns-mode", "transparent",
            "--dns-listen", "127.0.0.1:0",
            "--upstream-servers", f"{DNS4}:53",
            "--policy-directory", str(d / "policies"),
            "--policy-endpoints", str(d / "endpoints.yaml"),
            "--datapath-enabled", "true",
            "--datapath-pin-dir", str(self.pin_dir),
            "--state-directory", str(d / "state"),
            "--state-snapshot-interval", "1",
            "--state-admin-socket", str(d / "admin.sock"),
            "--audit-path", str(d / "audit.jsonl"),
            "--metrics-listen", "",
        ], netns=self.topology.node, start_timeout=180)


@pytest.fixture
def world(tmp_path: Path, pin_dir: Path) -> Iterator[World]:
    require(Path("/usr/sbin/knotd").exists(), "knotd not installed (run `make bootstrap`)")
    with topo.topology(ports=(8080, 8081)) as t:
        for address in EXTRA_WORLD:
            netns.run(t.world, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        with knot.KnotServer(listen=[(DNS4, 53)], netns=t.world, workers=1):
            (tmp_path / "policies").mkdir()
            (tmp_path / "policies" / "web.yaml").write_text(POLICY)
            (tmp_path / "endpoints.yaml").write_text(INVENTORY)
            yield World(t, tmp_path, pin_dir)


def _dig(pod: topo.Pod, name: str) -> tuple[str, list[str]]:
    out = netns.run(pod.ns, "dig", "+tries=1", "+time=3", f"@{DNS4}", name, "A",
                    check=False).stdout
    status = next((line.split("status: ")[1].split(",")[0]
                   for line in out.splitlines() if "status: " in line), "TIMEOUT")
    answers = [line.split()[-1] for line in out.splitlines()
               if "\tIN\tA\t" in line and not line.startswith(";")]
    return status, answers


def _redirection(node: str) -> dict[str, int]:
    """How many of each piece of the redirection the node has: nftables table and its TPROXY
    rules, fwmark rules and local routes per family."""
    tables = netns.run(node, "nft", "list", "tables").stdout.splitlines()
    table = netns.run(node, "nft", "list", "table", "inet", "fqdnproxy", check=False).stdout
    found = {"table": tables.count("table inet fqdnproxy"), "tproxy": table.count("tproxy ")}
    for family in ("-4", "-6"):
        rules = netns.run(node, "ip", family, "rule").stdout
        routes = netns.run(node, "ip", family, "route", "show", "table", "153").stdout
        found[f"rule{family}"] = rules.count("fwmark 0x1d53 lookup 153")
        found[f"route{family}"] = len([r for r in routes.splitlines() if r.startswith("local")])
    return found


INSTALLED = {"table": 1, "tproxy": 2, "rule-4": 1, "route-4": 1, "rule-6": 1, "route-6": 1}


def _filters(t: topo.Topology) -> int:
    return len([f for f in attach.attached(t.pod1.host_if, netns=t.node)
                if f["prio"] == attach.FILTER_PRIO])


def test_kill_9_under_load_loses_nothing_allowed_and_the_dns_gap_is_measured(
        world: World) -> None:
    t = world.topology
    agent = world.agent().start()
    load: subprocess.Popen[str] | None = None
    try:
        for name, ip in zip(NAMES, RELEASED):
            assert _dig(t.pod1, name) == ("NOERROR", [ip])
        allowed = [f"tcp,{ip},8080" for ip in RELEASED]
        assert t.probe(t.pod1, *allowed, *NEVER) == [True] * 3 + [False] * 2
        assert _redirection(t.node) == INSTALLED and _filters(t) == 1

        load = subprocess.Popen(
            ["ip", "netns", "exec", t.pod1.ns, sys.executable, topo.PEER, "load",
             ",".join((DNS4, *NAMES)), str(QPS), HOLD, *allowed, *NEVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None and load.stdout.readline().strip() == "started"
        time.sleep(2)  # the load runs against the first agent

        killed = time.monotonic()
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        # No agent: nothing was cleaned up, nothing needs to be.
        assert _redirection(t.node) == INSTALLED and _filters(t) == 1
        agent = world.agent().start()
        ready = time.monotonic()
        # The new agent replaced, not added: one table, one rule per family, one filter.
        assert _redirection(t.node) == INSTALLED and _filters(t) == 1
        time.sleep(3)  # and against the new one

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
    assert _redirection(t.node)["table"] == 0  # a clean stop removes the redirection

    sent = {ident: at for at, ident in report["sent"]}
    answered = {int(ident): (at, rcode) for ident, (at, rcode) in report["answered"].items()}
    after_kill = sorted(at for at, _ in answered.values() if at > killed)
    assert after_kill, "no DNS answer after the kill"
    gap = after_kill[0] - killed
    lost = [ident for ident in sent if ident not in answered]
    lost_in_gap = [ident for ident in lost if killed <= sent[ident] <= after_kill[0]]
    probes = report["probes"]
    during = {spec: [ok for at, ok in probes[spec] if killed <= at <= after_kill[0]]
              for spec in probes}
    tried = sum(len(probes[spec]) for spec in allowed)
    print(f"\nkill -9 under load (transparent DNS, datapath enforcing): DNS gap {gap:.2f} s "
          f"(kill to the new agent's first answer; its start took {ready - killed:.2f} s), "
          f"{len(lost)} of {len(sent)} queries lost at {QPS} q/s ({len(lost_in_gap)} sent in "
          f"the gap); new connections to released IPs: "
          f"{sum(ok for spec in allowed for _, ok in probes[spec])} of {tried} succeeded "
          f"({sum(len(during[spec]) for spec in allowed)} during the gap); to never-released: "
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
        assert during[spec], f"{spec}: nothing tried while no agent ran"
    # Nothing allowed that was not: never-released IPs and ports stay dropped throughout.
    for spec in NEVER:
        assert during[spec] and not any(ok for _, ok in probes[spec]), spec
    for line in (world.directory / "audit.jsonl").read_text().splitlines():
        validate(json.loads(line))
