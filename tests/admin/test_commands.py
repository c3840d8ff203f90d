"""status, endpoint list, policy list, map dump and cache clean: handlers over a real socket,
a real policy store, cache and learner, the in-memory allow map, and the CLI's tables."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fqdnproxy import cli, config
from fqdnproxy.admin import client, commands
from fqdnproxy.admin.server import AdminServer
from fqdnproxy.datapath import maps as codecs
from fqdnproxy.datapath.allowmap import AllowKey, InMemoryAllowMap, kernel_now_ns
from fqdnproxy.datapath.maps import Reason
from fqdnproxy.fqdn.cache import FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner
from fqdnproxy.observe.http import Readiness
from fqdnproxy.policy.reload import PolicyStore

S = 1_000_000_000

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: demo}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
    - toFQDNs:
        - matchName: api.demo.test
        - matchName: db.demo.test
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"""

OTHER = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: batch, namespace: demo}
spec:
  endpointSelector:
    matchLabels: {app: batch}
"""

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["198.51.100.10"],
     interface: lxc1}
  - {namespace: demo, name: canary, id: 2, labels: {app: web, "fqdnproxy.io/audit": "true"},
     ips: ["198.51.100.11"]}
  - {namespace: demo, name: batch, id: 3, labels: {app: batch}, ips: ["198.51.100.12"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["198.51.100.53"]}
"""


class FakeMaps:
    """``PinnedMaps._iterate`` over an in-memory allow map (what the entry count walks)."""

    def __init__(self, allow_map: InMemoryAllowMap) -> None:
        self._allow = allow_map

    def _iterate(self, name: str, key_type: type, value_type: type) -> list[tuple[Any, Any]]:
        exact = name == "allow_exact"
        return [(None, None) for e in self._allow.dump() if e.key.exact == exact]


class FakeDatapath:
    """The datapath surface the commands use: counters, dump, maps."""

    def __init__(self, allow_map: InMemoryAllowMap) -> None:
        self.allow_map = allow_map
        self.maps = FakeMaps(allow_map)

    def counters(self) -> dict[int, dict[Reason, int]]:
        return {1: {Reason.PASS_ALLOWED: 10, Reason.DROP_NO_ENTRY: 3},
                2: {Reason.AUDITED: 4, Reason.EVENT_SUPPRESSED: 1}}

    def dump(self) -> list[Any]:
        return self.allow_map.dump()


@dataclass
class View:
    config: config.AgentConfig
    store: PolicyStore
    cache: FqdnCache
    learner: AllowLearner
    datapath: Any
    readiness: Readiness = field(default_factory=Readiness)
    started: float = field(default_factory=lambda: time.time() - 3723)
    last_reload: commands.ReloadRecord | None = None


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[View, AdminServer]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "web.yaml").write_text(POLICY)
    (policies / "batch.yaml").write_text(OTHER)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    store = PolicyStore(policies, tmp_path / "endpoints.yaml")
    current = store.load()
    cache = FqdnCache()
    allow_map = InMemoryAllowMap()
    learner = AllowLearner(cache, allow_map, lambda i: current.engine.for_id(i))
    now = kernel_now_ns()
    for endpoint_id in (1, 2):
        cache.learn(endpoint_id, "api.demo.test.", [("203.0.113.10", now + 300 * S)])
        cache.learn(endpoint_id, "db.demo.test.", [("203.0.113.10", now + 60 * S),
                                                   ("203.0.113.11", now + 60 * S)])
        learner.reevaluate([endpoint_id])
    view = View(config.load(None), store, cache, learner, FakeDatapath(allow_map),
                last_reload=commands.ReloadRecord(time.time(), "rejected", 1,
                                                  ("web.yaml: document 1: spec: bad",)))
    view.readiness.mark("policies", "datapath", "cache")
    server = AdminServer(tmp_path / "admin.sock", commands.handlers(view))
    await server.start()
    yield view, server
    await server.stop()


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def _call(server: AdminServer, command: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(client.call, server.path, command, args or {})


async def test_status(agent: tuple[View, AdminServer]) -> None:
    view, server = agent
    status = await _call(server, "status")
    assert status["uptime_s"] >= 3723 and status["ready"] is False
    assert status["readiness"] == {"policies": True, "datapath": True, "cache": True,
                                   "listeners": False}
    assert status["endpoints"] == {"workloads": 3, "services": 1, "enforced": 2, "audit": 1}
    assert status["policies"]["loaded"] == 2 and status["policies"]["version"] == 1
    assert status["cache"] == {"entries": 6, "names": 4}
    assert status["datapath"]["allow_entries"] == {"exact": 4, "prefix": 0}
    assert status["last_reload"]["result"] == "rejected"
    code, out, _ = await asyncio.to_thread(_cli, "status", "--socket", str(server.path))
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert lines["ready"].strip() == "no (waiting for listeners)"
    assert "(up 1h2m" in lines["started"]
    assert lines["endpoints"].strip() == "3 workloads (2 enforced, 1 in audit mode), 1 services"
    assert lines["allow map"].strip() == "4 exact, 0 prefix entries"
    assert "  error:     web.yaml: document 1: spec: bad" in out


async def test_endpoint_list(agent: tuple[View, AdminServer]) -> None:
    _, server = agent
    rows = await _call(server, "endpoint.list")
    by_key = {r["endpoint"]: r for r in rows}
    assert by_key["demo/web"]["mode"] == "enforce" and by_key["demo/web"]["names"] == 2
    assert by_key["demo/web"]["packets"] == {"pass": 10, "drop": 3, "audit": 0}
    assert by_key["demo/canary"]["mode"] == "audit"
    assert by_key["demo/canary"]["packets"] == {"pass": 0, "drop": 0, "audit": 4}
    assert by_key["demo/batch"]["mode"] == "unenforced"
    assert by_key["demo/batch"]["policies"] == ["demo/batch"]
    assert by_key["kube-system/kube-dns"]["mode"] == "service"
    code, out, _ = await asyncio.to_thread(_cli, "endpoint", "list", "--socket", str(server.path))
    assert code == 0
    assert out.splitlines()[0].split() == ["ENDPOINT", "ID", "KIND", "MODE", "IPS", "INTERFACE",
                                           "POLICIES", "NAMES", "PASSED", "DROPPED", "AUDITED"]
    assert out.splitlines()[4].split() == ["demo/web", "1", "workload", "enforce",
                                           "198.51.100.10", "lxc1", "demo/web", "2", "10", "3", "0"]


async def test_policy_list(agent: tuple[View, AdminServer]) -> None:
    _, server = agent
    rows = await _call(server, "policy.list")
    assert [(r["policy"], Path(r["file"]).name, r["document"], r["endpoints"]) for r in rows] == [
        ("demo/batch", "batch.yaml", 1, ["demo/batch"]),
        ("demo/web", "web.yaml", 1, ["demo/canary", "demo/web"]),
    ]
    code, out, _ = await asyncio.to_thread(_cli, "policy", "list", "--socket", str(server.path),
                                           "--output", "json")
    assert code == 0 and json.loads(out) == rows


async def test_map_dump_over_the_socket(agent: tuple[View, AdminServer]) -> None:
    _, server = agent
    rows = await _call(server, "map.dump")
    assert [(r["endpoint"], r["endpoint_name"], r["prefix"], r["ports"]) for r in rows] == [
        (1, "demo/web", "203.0.113.10/32", ["tcp/443"]),
        (1, "demo/web", "203.0.113.11/32", ["tcp/443"]),
        (2, "demo/canary", "203.0.113.10/32", ["tcp/443"]),
        (2, "demo/canary", "203.0.113.11/32", ["tcp/443"]),
    ]
    assert 290 < rows[0]["expires_in"] <= 300
    code, out, _ = await asyncio.to_thread(_cli, "map", "dump", "--socket", str(server.path))
    assert code == 0
    assert out.splitlines()[0].split() == ["ENDPOINT", "NAME", "PREFIX", "PORTS", "EXPIRES", "IN"]
    assert out.splitlines()[1].split()[:4] == ["1", "demo/web", "203.0.113.10/32", "tcp/443"]


async def test_cache_clean_by_name_rewrites_and_deletes_map_entries(
        agent: tuple[View, AdminServer]) -> None:
    view, server = agent
    allow = view.datapath.allow_map

    def entry(endpoint_id: int, ip: str) -> Any:
        return allow.lookup(AllowKey(endpoint_id, ipaddress.ip_network(ip)))

    long_expiry = entry(1, "203.0.113.10").expiry_ns
    result = await _call(server, "cache.clean", {"endpoint": "demo/web", "name": "API.demo.test"})
    assert result == {"endpoints": 1, "names": 1, "ips": 1, "map_rewritten": 1, "map_deleted": 0}
    # 203.0.113.10 is still held by db.demo.test: rewritten with that name's (shorter) expiry.
    assert entry(1, "203.0.113.10").expiry_ns < long_expiry
    assert entry(2, "203.0.113.10").expiry_ns == long_expiry  # the other endpoint is untouched
    code, out, _ = await asyncio.to_thread(_cli, "cache", "clean", "--socket", str(server.path),
                                           "--name", "db.demo.test")
    assert code == 0
    assert out.strip() == ("removed 2 names (4 IPs) of 2 endpoints; allow map: 3 entries "
                           "deleted, 1 rewritten")
    assert entry(1, "203.0.113.10") is None and entry(1, "203.0.113.11") is None
    assert entry(2, "203.0.113.10") is not None and entry(2, "203.0.113.11") is None


async def test_cache_clean_an_endpoint(agent: tuple[View, AdminServer]) -> None:
    view, server = agent
    result = await _call(server, "cache.clean", {"endpoint": "2"})
    assert result == {"endpoints": 1, "names": 2, "ips": 2, "map_rewritten": 0, "map_deleted": 2}
    assert {e.endpoint_id for e in view.datapath.allow_map.dump()} == {1}
    assert view.cache.endpoint_ids() == [1]


async def test_cache_clean_errors(agent: tuple[View, AdminServer]) -> None:
    _, server = agent
    with pytest.raises(client.AdminError, match="no endpoint 'demo/nope'"):
        await _call(server, "cache.clean", {"endpoint": "demo/nope"})
    with pytest.raises(client.AdminError, match="needs an endpoint, a name, or both"):
        await _call(server, "cache.clean", {})
    code, _, err = await asyncio.to_thread(_cli, "cache", "clean", "--socket", str(server.path))
    assert code == 2 and "needs --endpoint, --name or both" in err


def test_commands_without_an_agent(tmp_path: Path) -> None:
    for argv in (["status"], ["endpoint", "list"], ["policy", "list"], ["map", "dump"],
                 ["cache", "clean", "--name", "x"]):
        code, _, err = _cli(*argv, "--socket", str(tmp_path / "none.sock"))
        assert code == 1 and "is `fqdnproxy run` running?" in err, argv


def test_map_dump_from_pins_is_unchanged() -> None:
    from fqdnproxy.datapath import dump
    from fqdnproxy.datapath.allowmap import AllowEntry, PortRange

    entries = [AllowEntry(3, "203.0.113.5/32", 70 * S, (PortRange.parse("tcp/443"),)),
               AllowEntry(3, "2001:db8::/32", 0, (PortRange(),))]
    out = dump.render(entries, 10 * S)
    assert out.splitlines()[0].split() == ["ENDPOINT", "PREFIX", "PORTS", "EXPIRES", "IN"]
    assert out.splitlines()[1].split() == ["3", "203.0.113.5/32", "tcp/443", "60.0s"]
    assert out.splitlines()[2].split()[-1] == "static"
    assert codecs.Reason.AUDITED.name == "AUDITED"


def test_cache_rows_of_several_workers_merge_per_endpoint_and_name() -> None:
    """Each DNS worker lists its own cache; worker 0 answers with one row per (endpoint, name):
    the IPs' union, the latest expiry, and a lookup's source over a restored entry's."""
    def row(name: str, ips: list[str], ttl: int, source: str = "lookup") -> dict[str, Any]:
        return {"endpoint": "demo/web", "endpoint_id": 7, "name": name, "source": source,
                "ips": ips, "ttl": ttl, "expires": f"2026-11-28T00:00:{ttl:02d}Z"}

    merged = commands.merge_cache_rows([
        [row("a.test.", ["192.0.2.2"], 10), row("restored", ["192.0.2.9"], 5, "restored")],
        [row("a.test.", ["192.0.2.1", "192.0.2.2"], 30), row("b.test.", ["192.0.2.3"], 20)],
    ])
    assert [(r["name"], r["ips"], r["ttl"], r["expires"]) for r in merged] == [
        ("a.test.", ["192.0.2.1", "192.0.2.2"], 30, "2026-11-28T00:00:30Z"),
        ("b.test.", ["192.0.2.3"], 20, "2026-11-28T00:00:20Z"),
        ("restored", ["192.0.2.9"], 5, "2026-11-28T00:00:05Z")]
    assert commands.merge_cache_rows([[row("a.test.", ["192.0.2.1"], 1, "restored")],
                                      [row("a.test.", ["192.0.2.1"], 1)]])[0]["source"] == "lookup"
    assert commands.merge_cache_rows([]) == []
