"""Transparent mode in namespaces: pods query their usual server, the node hands the query to the
proxy through nftables TPROXY, and the answer comes back from that server's address.

    pod1, pod2 --(lxc1, lxc2)-- node [fqdnproxy run --dns-mode transparent] --(wan0)-- world
                                                                   knot on 203.0.113.9:53, [2001:db8:ff::3]:53
"""

from __future__ import annotations

import json
import sys
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

DNS4, DNS6 = "203.0.113.9", "2001:db8:ff::3"
ECHO_PORTS = (8080, 8081, 853, 5353)

POLICY = web_policy(['matchPattern: "*.demo.test"'], ["matchName: api.demo.test"],
                    fqdn_port=8080)

INVENTORY = f"""\
endpoints:
  - {{namespace: demo, name: pod1, id: 1, labels: {{app: web}}, ips: ["192.0.2.10", "2001:db8:1::10"],
     interface: lxc1}}
  - {{namespace: demo, name: pod2, id: 2, labels: {{app: web}}, ips: ["192.0.2.20", "2001:db8:2::20"],
     interface: lxc2}}
  - {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}},
     ips: ["{DNS4}", "{DNS6}"]}}
"""


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path,
        pin_dir: Path) -> Iterator[tuple[topo.Topology, Path]]:
    """The agent in transparent mode, with ``request.param`` DNS workers (default 1)."""
    require(Path("/usr/sbin/knotd").exists(), "knotd not installed (run `make bootstrap`)")
    workers = getattr(request, "param", 1)
    # Workers share fixed ports (SO_REUSEPORT); one process may let the kernel pick.
    listen = "127.0.0.1:0" if workers == 1 else "127.0.0.1:5399"
    with topo.topology(ports=ECHO_PORTS) as t:
        with knot.KnotServer(listen=[(DNS4, 53), (DNS6, 53)], netns=t.world, workers=1):
            (tmp_path / "policies").mkdir()
            (tmp_path / "policies" / "web.yaml").write_text(POLICY)
            (tmp_path / "endpoints.yaml").write_text(INVENTORY)
            agent = AgentProcess([
                "--dns-mode", "transparent",
                "--dns-listen", listen,
                "--dns-workers", str(workers),
                "--upstream-servers", f"{DNS4}:53",
                "--policy-directory", str(tmp_path / "policies"),
                "--policy-endpoints", str(tmp_path / "endpoints.yaml"),
                "--datapath-enabled", "true",
                "--datapath-pin-dir", str(pin_dir),
                "--state-directory", str(tmp_path / "state"),
                "--state-admin-socket", str(tmp_path / "admin.sock"),
                "--audit-path", str(tmp_path / "audit.jsonl"),
                "--metrics-listen", "",
            ], netns=t.node, start_timeout=120)
            with agent:
                if workers > 1:
                    agent.wait_for(f"[worker {workers - 1}]: forwarding to")
                yield t, tmp_path
            assert agent.stop() == 0
            # A clean stop removes the redirection: table, fwmark rules, local routes.
            assert "fqdnproxy" not in netns.run(t.node, "nft", "list", "tables").stdout
            assert "0x1d53" not in netns.run(t.node, "ip", "rule").stdout


def _dig(pod: topo.Pod, *args: str) -> tuple[str, list[str], str]:
    out = netns.run(pod.ns, "dig", "+tries=1", "+time=3", *args, check=False).stdout
    status = next((line.split("status: ")[1].split(",")[0]
                   for line in out.splitlines() if "status: " in line), "TIMEOUT")
    answers = [line.split()[-1] for line in out.splitlines()
               if "\tIN\t" in line and not line.startswith(";")]
    server = next((line.split("SERVER: ")[1].split("(")[0]
                   for line in out.splitlines() if "SERVER: " in line), "")
    assert "reply from unexpected source" not in out
    return status, answers, server


def _audit(path: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (path / "audit.jsonl").read_text().splitlines()]
    for record in records:
        validate(record)
    return records


@pytest.mark.parametrize("lab", [1, 2], indirect=True, ids=["one-process", "two-workers"])
def test_pods_query_their_server_and_the_answer_comes_from_it(
        lab: tuple[topo.Topology, Path], pin_dir: Path) -> None:
    """Also with two DNS workers: TPROXY's socket lookup picks one of the listeners that share
    the port, and the answer still comes from the server asked."""
    t, state = lab
    assert _dig(t.pod1, f"@{DNS4}", "api.demo.test", "A") == (
        "NOERROR", ["203.0.113.10"], f"{DNS4}#53")
    assert _dig(t.pod1, "+tcp", f"@{DNS4}", "api.demo.test", "A")[:2] == (
        "NOERROR", ["203.0.113.10"])
    assert _dig(t.pod1, f"@{DNS6}", "api.demo.test", "AAAA") == (
        "NOERROR", ["2001:db8::10"], f"{DNS6}#53")
    assert _dig(t.pod1, "+tcp", f"@{DNS6}", "www.demo.test", "A")[0] == "NOERROR"
    assert t.probe(t.pod1, "tcp,203.0.113.10,8080") == [True]  # learned through the redirect
    records = [r for r in _audit(state) if r["type"] in ("query", "answer")]
    servers = {(r["server"]["ip"], r["protocol"]) for r in records if r["server"]}
    assert {(DNS4, "udp"), (DNS4, "tcp"), (DNS6, "udp"), (DNS6, "tcp")} <= servers
    assert all(r["endpoint"]["name"] == "pod1" for r in records)
    if (pin_dir / "allow_exact_1").exists():  # two workers: both take redirected queries
        for _ in range(30):  # on one worker alone: once in 2**29 runs
            assert _dig(t.pod1, f"@{DNS4}", "api.demo.test", "A")[0] == "NOERROR"
        for index in (0, 1):
            with pinned.PinnedMaps.open(pin_dir, index) as maps:
                assert "203.0.113.10/32" in {str(e.network) for e in maps.dump() if e.expiry_ns}


def test_no_way_around_the_proxy(lab: tuple[topo.Topology, Path], pin_dir: Path) -> None:
    t, state = lab
    # Another server on port 53 is redirected too; the policy allows DNS to kube-dns only.
    assert _dig(t.pod1, "@203.0.113.1", "api.demo.test", "A")[0] == "REFUSED"
    assert _dig(t.pod1, "+tcp", "@203.0.113.1", "api.demo.test", "A")[0] == "REFUSED"
    # A name the policy does not allow, asked of the right server.
    assert _dig(t.pod1, f"@{DNS4}", "example.org", "A")[0] == "REFUSED"
    # The same over IPv6: another server is refused, a refused name too.
    assert _dig(t.pod1, "@2001:db8:ff::1", "api.demo.test", "AAAA")[0] == "REFUSED"
    assert _dig(t.pod1, "+tcp", "@2001:db8:ff::1", "api.demo.test", "AAAA")[0] == "REFUSED"
    # DNS-over-TLS, DNS over TCP to another port, and connections to addresses never resolved,
    # are dropped (both families); the echo servers listen on all of those.
    assert t.probe(t.pod1, f"tcp,{DNS4},853", f"tcp,{DNS6},853", f"tcp,{DNS4},5353",
                   f"udp,{DNS4},5353", "tcp,203.0.113.1,8080",
                   "tcp,2001:db8:ff::1,8080") == [False] * 6
    # What pod1 resolved does not open anything for pod2.
    assert _dig(t.pod1, f"@{DNS4}", "api.demo.test", "A")[0] == "NOERROR"
    assert t.probe(t.pod2, "tcp,203.0.113.10,8080") == [False]
    # Only the IPv4 answer was learned: nothing opens the name's IPv6 address.
    dump = netns.run(t.node, sys.executable, "-m", "fqdnproxy", "map", "dump", "--pin-dir",
                     str(pin_dir), "--output", "json").stdout
    learned = {row["prefix"] for row in json.loads(dump) if row["endpoint"] == 1}
    assert "203.0.113.10/32" in learned and "2001:db8::10/128" not in learned
    records = _audit(state)
    drops = {(r["destination"]["ip"], r["destination"]["port"]): r["reason"]
             for r in records if r["type"] == "drop"}
    # Nothing was learned for it: "no_entry", not a port mismatch of some catch-all entry.
    assert drops.get(("203.0.113.1", 8080)) in (None, "no_entry")
    dns = [r for r in records if r["type"] in ("query", "answer")]
    assert [r["verdict"] for r in dns][:6] == ["denied"] * 5 + ["allowed"]
