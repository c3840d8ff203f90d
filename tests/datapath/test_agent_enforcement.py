"""The whole agent enforcing in namespaces (tiers 3 and 4): a pod resolves through the proxy,
the answer's IP reaches the kernel map before release, the tc program lets exactly that through,
another pod gains nothing, and a ``kill -9`` of the agent changes nothing for the pod.

    pod1, pod2 --(lxc1, lxc2)-- node [fqdnproxy run, datapath on] --(wan0)-- world [knot, servers]

The agent runs in the node namespace (explicit mode: pods use 192.0.2.1, the node's address on
their link, as their DNS server), knot serves demo.test in the world namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fqdnproxy.datapath import pinned
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.conftest import require
from tests.datapath import topology as topo
from tests.support import netns
from tests.support.audit_schema import validate
from tests.support.policies import web_policy

pytestmark = pytest.mark.root

KNOT = ("203.0.113.9", 5353)

POLICY = web_policy(["matchName: api.demo.test", "matchName: www.demo.test"], ["matchName: api.demo.test", "matchName: www.demo.test"], fqdn_port=8080)

INVENTORY = """\
endpoints:
  - {namespace: demo, name: pod1, id: 1, labels: {app: web}, ips: ["192.0.2.10"],
     interface: lxc1}
  - {namespace: demo, name: pod2, id: 2, labels: {app: web}, ips: ["192.0.2.20"],
     interface: lxc2}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["192.0.2.1"]}
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[topo.Topology, knot.KnotServer]]:
    require(knot.KnotServer(listen=[KNOT]).knotd and Path("/usr/sbin/knotd").exists(),
            "knotd not installed (apt package knot; run `make bootstrap`)")
    with topo.topology() as t:
        with knot.KnotServer(listen=[KNOT], netns=t.world, workers=1) as server:
            yield t, server


def _agent(t: topo.Topology, pin_dir: Path, tmp_path: Path,
           extra: tuple[str, ...] = ()) -> AgentProcess:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "web.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    return AgentProcess([
        "--dns-listen", "192.0.2.1:53",
        "--upstream-servers", f"{KNOT[0]}:{KNOT[1]}",
        "--policy-directory", str(policies),
        "--policy-endpoints", str(tmp_path / "endpoints.yaml"),
        "--datapath-enabled", "true",
        "--datapath-pin-dir", str(pin_dir),
        "--state-directory", str(tmp_path / "state"),
        "--state-admin-socket", str(tmp_path / "admin.sock"),
        "--audit-path", str(tmp_path / "audit.jsonl"),
        "--metrics-listen", "",
        "--policy-reload-interval", "0.2", *extra,
    ], netns=t.node, start_timeout=120)


def _dig(pod: topo.Pod, name: str) -> tuple[str, list[str]]:
    out = netns.run(pod.ns, "dig", "+tries=1", "+time=3", "@192.0.2.1", name, "A", check=False)
    status = next((line.split("status: ")[1].split(",")[0]
                   for line in out.stdout.splitlines() if "status: " in line), "TIMEOUT")
    answers = [line.split()[-1] for line in out.stdout.splitlines()
               if "\tIN\tA\t" in line and not line.startswith(";")]
    return status, answers


def _cache(tmp_path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [".venv/bin/fqdnproxy", "cache", "list", "--socket", str(tmp_path / "admin.sock"),
         "--output", "json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_learned_ip_is_enforced_per_pod_and_survives_kill_9(
        world: tuple[topo.Topology, knot.KnotServer], pin_dir: Path, tmp_path: Path) -> None:
    t, _ = world
    api = "tcp,203.0.113.10,8080"
    agent = _agent(t, pin_dir, tmp_path, ("--datapath-allow-max", "5000")).start()
    try:
        assert pinned.size_differences(pin_dir, {"allow_exact": 5000, "allow": 5000}) == []
        assert t.probe(t.pod1, api) == [False]  # never resolved: dropped
        assert _dig(t.pod1, "api.demo.test") == ("NOERROR", ["203.0.113.10"])
        assert t.probe(t.pod1, api, "tcp,203.0.113.10,8081", "tcp,203.0.113.1,8080") == [
            True, False, False]  # the learned IP, on the allowed port only
        assert t.probe(t.pod2, api) == [False]  # same policy, but pod2 never looked it up
        assert _dig(t.pod1, "db.demo.test")[0] == "REFUSED"
        assert [r["name"] for r in _cache(tmp_path)] == ["api.demo.test."]

        agent.stop(signal.SIGKILL)
        assert t.probe(t.pod1, api) == [True]  # the kernel enforces without the agent
        assert t.probe(t.pod2, api) == [False]

        agent = _agent(t, pin_dir, tmp_path).start()  # asks for the default size: told it stays
        assert any("map allow_exact is pinned with 5000 entries, the configuration asks for "
                   "262144" in line for line in agent.log)
        rows = _cache(tmp_path)  # no snapshot was written: the map entry comes back unnamed
        assert [(r["name"], r["ips"], r["source"]) for r in rows] == [
            ("restored", ["203.0.113.10"], "restored")]
        assert t.probe(t.pod1, api) == [True] and t.probe(t.pod2, api) == [False]
        assert _dig(t.pod1, "www.demo.test")[0] == "NOERROR"
    finally:
        agent.stop()
    for line in (tmp_path / "audit.jsonl").read_text().splitlines():
        validate(json.loads(line))


def _wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cname_chain_reload_reevaluation_and_endpoint_removal(
        world: tuple[topo.Topology, knot.KnotServer], pin_dir: Path, tmp_path: Path) -> None:
    t, _ = world
    api = "tcp,203.0.113.10,8080"
    agent = _agent(t, pin_dir, tmp_path).start()
    policy = tmp_path / "policies" / "web.yaml"
    selected = "        - matchName: www.demo.test\n      toPorts"
    try:
        # www -> web -> api: the IP is learned under the name asked, with the chain's min TTL.
        assert _dig(t.pod1, "www.demo.test") == ("NOERROR", ["203.0.113.10"])
        assert t.probe(t.pod1, api) == [True]
        # No longer selected by toFQDNs: the entry goes at once, no new lookup needed.
        policy.write_text(policy.read_text().replace(selected, "      toPorts"))
        assert _wait_for(lambda: t.probe(t.pod1, api) == [False])
        # Selected again: the cached name is allowed at once.
        policy.write_text(policy.read_text().replace(
            "        - matchName: api.demo.test\n      toPorts", "        - matchName: api.demo.test\n" + selected))
        assert _wait_for(lambda: t.probe(t.pod1, api) == [True])
        # pod1 leaves the inventory: everything it learned is gone.
        inventory = tmp_path / "endpoints.yaml"
        inventory.write_text(inventory.read_text().replace(
            '  - {namespace: demo, name: pod1, id: 1, labels: {app: web}, ips: ["192.0.2.10"],\n'
            '     interface: lxc1}\n', ""))
        assert _wait_for(lambda: _cache(tmp_path) == [])
        dump = subprocess.run(
            [".venv/bin/fqdnproxy", "map", "dump", "--pin-dir", str(pin_dir), "--output", "json"],
            capture_output=True, text=True, check=True)
        assert all(entry["endpoint"] != 1 for entry in json.loads(dump.stdout))
    finally:
        agent.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False)  # exit status 1: no children
    return [int(p) for p in out.stdout.split()]


def test_dns_workers_share_queries_and_enforce_as_one(
        world: tuple[topo.Topology, knot.KnotServer], pin_dir: Path, tmp_path: Path) -> None:
    """dns.workers 2: the kernel spreads a pod's lookups over both processes, each learns into
    its own exact map, and the program admits what either learned; a worker that dies is
    started again, and none outlives the agent."""
    t, _ = world
    api = "tcp,203.0.113.10,8080"
    agent = _agent(t, pin_dir, tmp_path, ("--dns-workers", "2")).start()
    try:
        agent.wait_for("[worker 1]: forwarding to")
        [worker] = _children(agent.pid)
        assert t.probe(t.pod1, api) == [False]
        # dig takes a new source port each time; the kernel hashes the 4-tuple to a worker, so
        # 40 lookups all landing on one of two workers would happen once in 2**39 runs.
        for _ in range(40):
            assert _dig(t.pod1, "api.demo.test") == ("NOERROR", ["203.0.113.10"])
        learned = {}
        for index in (0, 1):
            with pinned.PinnedMaps.open(pin_dir, index) as maps:
                learned[index] = [(e.endpoint_id, str(e.network)) for e in maps.dump()
                                  if e.expiry_ns]  # not the static rules (worker 0's map)
        assert learned == {0: [(1, "203.0.113.10/32")], 1: [(1, "203.0.113.10/32")]}
        dump = subprocess.run(  # the operator's view: every worker's entries
            [".venv/bin/fqdnproxy", "map", "dump", "--pin-dir", str(pin_dir), "--output", "json"],
            capture_output=True, text=True, check=True)
        assert [e["prefix"] for e in json.loads(dump.stdout) if e["endpoint"] == 1].count(
            "203.0.113.10/32") == 2
        assert t.probe(t.pod1, api, "tcp,203.0.113.10,8081") == [True, False]
        assert t.probe(t.pod2, api) == [False]
        assert _dig(t.pod1, "db.demo.test")[0] == "REFUSED"

        os.kill(worker, signal.SIGKILL)
        agent.wait_for("worker 1 (pid")  # "... exited with status -9; starting it again"
        assert _wait_for(lambda: len(_children(agent.pid)) == 1 and
                         _children(agent.pid) != [worker], timeout=30)
        restarted = _children(agent.pid)[0]
        assert _wait_for(lambda: sum("[worker 1]: forwarding to" in line for line in agent.log) == 2,
                         timeout=30)  # the new worker 1 serves (and answers its admin socket)
        assert t.probe(t.pod1, api) == [True]  # its map outlived it, as the pins do the agent's
        for _ in range(10):
            assert _dig(t.pod1, "www.demo.test")[0] == "NOERROR"
        # The admin socket speaks for every worker: one row per name, and a clean empties
        # every worker's map (else the other worker's entry would still let pod1 out).
        rows = {r["name"]: r["ips"] for r in _cache(tmp_path)}
        assert rows["api.demo.test."] == rows["www.demo.test."] == ["203.0.113.10"]
        # Worker 1, killed, found its map's entry without a snapshot: kept unnamed.
        assert set(rows) <= {"api.demo.test.", "www.demo.test.", "restored"}
        cleaned = subprocess.run(
            [".venv/bin/fqdnproxy", "cache", "clean", "--endpoint", "demo/pod1", "--socket",
             str(tmp_path / "admin.sock")], capture_output=True, text=True, check=True)
        assert cleaned.stdout.startswith("removed "), cleaned.stdout  # counts summed over workers
        assert _cache(tmp_path) == []
        assert t.probe(t.pod1, api) == [False]
        assert not [e for e in pinned.dump_every_worker(pin_dir) if e.expiry_ns]
    finally:
        agent.stop()
    assert not Path(f"/proc/{restarted}").exists()  # stopped with the agent
    for line in (tmp_path / "audit.jsonl").read_text().splitlines():
        validate(json.loads(line))
