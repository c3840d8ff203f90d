"""``fqdnproxy run`` as a process: /healthz, /readyz and /metrics on the metrics address, and the
admin commands (status, endpoint list, policy list, cache list and clean) against its socket."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fqdnproxy.lab.agent_process import AgentProcess

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: demo}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
    - toFQDNs: [{matchName: api.demo.test}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"""

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["127.0.0.2"]}
  - {namespace: demo, name: canary, id: 2, labels: {app: web, "fqdnproxy.io/audit": "true"},
     ips: ["127.0.0.3"]}
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, str, Path]]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "web.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    socket = tmp_path / "admin.sock"
    process = AgentProcess([
        "--dns-listen", "127.0.0.1:0",
        "--upstream-servers", "127.0.0.1:9",
        "--policy-directory", str(tmp_path / "policies"),
        "--policy-endpoints", str(tmp_path / "endpoints.yaml"),
        "--policy-reload-interval", "0.2",
        "--state-directory", str(tmp_path / "state"),
        "--state-admin-socket", str(socket),
        "--audit-path", str(tmp_path / "audit.jsonl"),
        "--metrics-listen", "127.0.0.1:0",
    ])
    with process:
        match = next(m for line in process.log
                     if (m := re.search(r"metrics on http://(\S+)/metrics", line)))
        yield process, f"http://{match.group(1)}", socket


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _cli(socket: Path, *argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fqdnproxy", *argv, "--socket", str(socket)],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout


def test_health_readiness_and_metrics(agent: tuple[AgentProcess, str, Path]) -> None:
    _, base, _ = agent
    assert _get(f"{base}/healthz") == (200, "ok\n")
    status, body = _get(f"{base}/readyz")
    assert status == 200 and body.splitlines()[0] == "ready", body
    status, body = _get(f"{base}/metrics")
    assert status == 200
    assert 'fqdnproxy_policy_reloads_total{result="loaded"} 1.0' in body
    assert "fqdnproxy_cache_entries 0.0" in body


def test_admin_commands(agent: tuple[AgentProcess, str, Path], tmp_path: Path) -> None:
    _, _, socket = agent
    status = json.loads(_cli(socket, "status", "--output", "json"))
    assert status["ready"] is True and status["datapath"] is None
    assert status["endpoints"] == {"workloads": 2, "services": 0, "enforced": 2, "audit": 1}
    assert status["last_reload"]["result"] == "loaded"
    text = _cli(socket, "status")
    assert "ready:       yes" in text and "last reload: loaded at" in text
    rows = json.loads(_cli(socket, "endpoint", "list", "--output", "json"))
    assert [(r["endpoint"], r["mode"]) for r in rows] == [("demo/canary", "audit"),
                                                          ("demo/web", "enforce")]
    policies = _cli(socket, "policy", "list")
    assert policies.splitlines()[2].split()[:2] == ["demo/web", "CiliumNetworkPolicy"]
    # A broken change is rejected; status says so, and the previous version keeps serving.
    (tmp_path / "policies" / "web.yaml").write_text("spec: [")
    for _ in range(100):
        status = json.loads(_cli(socket, "status", "--output", "json"))
        if status["last_reload"]["result"] == "rejected":
            break
    assert status["last_reload"]["result"] == "rejected" and status["last_reload"]["errors"]
    assert status["policies"]["version"] == 1
    assert "removed 0 names" in _cli(socket, "cache", "clean", "--name", "api.demo.test")
