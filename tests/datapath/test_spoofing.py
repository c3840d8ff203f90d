"""Forged upstream answers in namespaces: an attacker next to the upstream floods the proxy's
upstream sockets with answers claiming the real server's address, at guessed ports and IDs,
carrying its own IP. No forged IP may ever reach the allow map; the forged answers that hit a
proxy socket are counted (root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.conftest import require
from tests.datapath import topology as topo
from tests.support import netns
from tests.support.policies import web_policy

pytestmark = pytest.mark.root

DNS = "203.0.113.9"
FORGED = "203.0.113.66"
SPOOFER = str(Path(__file__).with_name("spoofer.py"))

POLICY = web_policy(["matchName: api.demo.test"], ["matchName: api.demo.test"], fqdn_port=8080)

INVENTORY = """\
endpoints:
  - {namespace: demo, name: pod1, id: 1, labels: {app: web}, ips: ["192.0.2.10"], interface: lxc1}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["192.0.2.1"]}
"""


@pytest.fixture
def world(tmp_path: Path, pin_dir: Path) -> Iterator[tuple[topo.Topology, AgentProcess, int]]:
    require(Path("/usr/sbin/knotd").exists(), "knotd not installed (run `make bootstrap`)")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "web.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    with topo.topology(ports=(8080,)) as t:
        with knot.KnotServer(listen=[(DNS, 53)], netns=t.world, workers=1):
            metrics_port = 19153
            agent = AgentProcess([
                "--dns-listen", "192.0.2.1:53", "--upstream-servers", f"{DNS}:53",
                "--policy-directory", str(tmp_path / "policies"),
                "--policy-endpoints", str(tmp_path / "endpoints.yaml"),
                "--datapath-enabled", "true", "--datapath-pin-dir", str(pin_dir),
                "--state-directory", str(tmp_path / "state"),
                "--state-admin-socket", str(tmp_path / "admin.sock"),
                "--audit-path", str(tmp_path / "audit.jsonl"),
                "--metrics-listen", f"127.0.0.1:{metrics_port}",
                "--upstream-sockets-per-server", "16",
            ], netns=t.node, start_timeout=120)
            with agent:
                yield t, agent, metrics_port


def _allow_prefixes(agent: AgentProcess) -> set[str]:
    pin_dir = agent.args[list(agent.args).index("--datapath-pin-dir") + 1]
    dump = subprocess.run([sys.executable, "-m", "fqdnproxy", "map", "dump", "--pin-dir", pin_dir,
                           "--output", "json"], capture_output=True, text=True, check=True)
    return {row["prefix"] for row in json.loads(dump.stdout)}


def _metrics(t: topo.Topology, port: int) -> str:
    code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    return netns.run(t.node, sys.executable, "-c", code).stdout


def test_forged_answers_never_reach_the_allow_map(
        world: tuple[topo.Topology, AgentProcess, int], tmp_path: Path) -> None:
    t, agent, port = world
    flood = subprocess.Popen(
        ["ip", "netns", "exec", t.world, sys.executable, SPOOFER, DNS, "53", "203.0.113.254",
         "api.demo.test", FORGED, "150000"], stdout=subprocess.PIPE, text=True)
    answers = set()
    deadline = time.monotonic() + 60
    while flood.poll() is None and time.monotonic() < deadline:
        out = netns.run(t.pod1.ns, "dig", "+short", "+tries=1", "+time=2", "@192.0.2.1",
                        "api.demo.test", check=False).stdout.split()
        answers.update(out)
    sent = int(flood.communicate(timeout=60)[0].strip())
    assert sent > 100_000
    assert answers == {"203.0.113.10"}  # the pod only ever saw the genuine answer
    prefixes = _allow_prefixes(agent)
    assert f"{FORGED}/32" not in prefixes and "203.0.113.10/32" in prefixes
    exposition = _metrics(t, port)
    stray = sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                if line.startswith("fqdnproxy_upstream_stray_answers_total"))
    assert stray > 0  # forged answers that hit one of the 16 sockets were seen and dropped


def test_a_pod_sending_answers_to_the_proxy_gains_nothing(
        world: tuple[topo.Topology, AgentProcess, int]) -> None:
    t, agent, port = world
    forge = ("import socket,sys;sys.path.insert(0,'" + str(Path(SPOOFER).parent) + "');"
             "import spoofer;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
             "[s.sendto(spoofer.answer('api.demo.test','" + FORGED + "',i),('192.0.2.1',53))"
             " for i in range(500)]")
    netns.run(t.pod1.ns, sys.executable, "-c", forge)
    time.sleep(0.5)
    assert f"{FORGED}/32" not in _allow_prefixes(agent)  # answers are never taken from clients
    assert "fqdnproxy_malformed_queries_total{outcome=\"dropped\"} 500.0" in _metrics(t, port)
