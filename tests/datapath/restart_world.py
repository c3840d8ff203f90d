"""The world of the restart root tests: one pod whose DNS is redirected to the agent (transparent
mode) and whose egress the datapath enforces, knot upstream, agents on the same pins and state.

    pod1 --(lxc1)-- node [fqdnproxy run --dns-mode transparent, datapath on] --(wan0)-- world
    world: knot at 203.0.113.9:53 (demo.test); echo servers on 8080 and 8081 at 203.0.113.1-12

``test_agent_kill.py`` measures the DNS gap of a kill -9 under load;
``test_agent_restart_compile.py`` looks inside that gap (the old program enforcing while the new
agent serves DNS and its own program compiles).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fqdnproxy.datapath import attach, pinned
from fqdnproxy.datapath.allowmap import AllowEntry, AllowKey
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.conftest import require
from tests.datapath import topology as topo
from tests.support import netns
from tests.support.policies import web_policy

DNS4 = "203.0.113.9"
NAMES = ("api.demo.test", "db.demo.test", "dual.demo.test")
RELEASED = ("203.0.113.10", "203.0.113.11", "203.0.113.12")  # what NAMES resolve to
EXTRA_WORLD = ("203.0.113.11", "203.0.113.12")  # not in the topology's world: added here
NEVER = ("tcp,203.0.113.1,8080", "tcp,203.0.113.10,8081")  # never resolved; a port not allowed
POD1_ID = 1

POLICY = web_policy(['matchPattern: "*.demo.test"'], [f"matchName: {n}" for n in NAMES],
                    fqdn_port=8080)

INVENTORY = f"""\
endpoints:
  - {{namespace: demo, name: pod1, id: {POD1_ID}, labels: {{app: web}}, ips: ["192.0.2.10"],
     interface: lxc1}}
  - {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}},
     ips: ["{DNS4}"]}}
"""

# How many of each piece of the redirection an agent installs (see ``redirection``).
INSTALLED = {"table": 1, "tproxy": 2, "rule-4": 1, "route-4": 1, "rule-6": 1, "route-6": 1}


@dataclass(frozen=True)
class World:
    topology: topo.Topology
    directory: Path
    pin_dir: Path

    def agent(self, entry: Sequence[str] = ("-m", "fqdnproxy", "run"),
              env: dict[str, str] | None = None) -> AgentProcess:
        """An agent on the same pins, state directory and admin socket every time."""
        return AgentProcess([*self.arguments()], netns=self.topology.node, start_timeout=180,
                            entry=entry, env=env)

    def arguments(self) -> list[str]:
        """The ``fqdnproxy run`` options of every agent here."""
        d = self.directory
        return [
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
        ]

    def program_ids(self) -> list[int]:
        """The ids of the programs in our filters on pod1's host-side interface (tc's view)."""
        out = netns.run(self.topology.node, "tc", "-j", "filter", "show", "dev",
                        self.topology.pod1.host_if, "ingress").stdout
        return [f["options"]["prog"]["id"] for f in json.loads(out)
                if f.get("pref") == attach.FILTER_PRIO and "options" in f]

    def learned(self, ip: str) -> AllowEntry | None:
        """pod1's entry for ``ip`` in the pinned map, read without the agent."""
        with pinned.PinnedMaps.open(self.pin_dir) as maps:
            return maps.lookup(AllowKey(POD1_ID, ipaddress.ip_network(f"{ip}/32")))


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


def dig(pod: topo.Pod, name: str) -> tuple[str, list[str]]:
    """Ask the pod's DNS server (redirected to the agent) for ``name``: (status, A records)."""
    out = netns.run(pod.ns, "dig", "+tries=1", "+time=3", f"@{DNS4}", name, "A",
                    check=False).stdout
    status = next((line.split("status: ")[1].split(",")[0]
                   for line in out.splitlines() if "status: " in line), "TIMEOUT")
    answers = [line.split()[-1] for line in out.splitlines()
               if "\tIN\tA\t" in line and not line.startswith(";")]
    return status, answers


def redirection(node: str) -> dict[str, int]:
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
