"""``fqdnproxy run`` with policies, as a process in front of knot: decisions, the cache over the
admin socket, reload (valid and invalid), and the snapshot across a restart and a ``kill -9``."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import dnslib
import pytest

from fqdnproxy import cli
from fqdnproxy.fqdn import snapshot
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.support.audit_schema import validate
from tests.support.policies import web_policy

WEB, STRANGER = "127.0.0.2", "127.0.0.9"

def policy(port: int) -> str:
    """DNS to kube-dns (the proxy, on ``port``) for api and www; their IPs on TCP 443."""
    names = ["matchName: api.demo.test", "matchName: www.demo.test"]
    return web_policy(names, names, dns_port=port)

INVENTORY = """\
endpoints:
  - {namespace: demo, name: web, id: 1, labels: {app: web}, ips: ["127.0.0.2"]}
  - {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns},
     ips: ["127.0.0.1"]}
"""


@dataclass
class Setup:
    port: int
    upstream: int
    policies: Path
    state: Path
    socket: Path
    audit: Path

    def agent(self, *extra: str) -> AgentProcess:
        return AgentProcess([*extra,
            "--dns-listen", f"127.0.0.1:{self.port}",
            "--upstream-servers", f"127.0.0.1:{self.upstream}",
            "--policy-directory", str(self.policies),
            "--policy-endpoints", str(self.policies.parent / "endpoints.yaml"),
            "--policy-reload-interval", "0.2",
            "--state-directory", str(self.state),
            "--state-admin-socket", str(self.socket),
            "--audit-path", str(self.audit),
            "--metrics-listen", "",
        ])

    def ask(self, name: str, source: str = WEB) -> dnslib.DNSRecord:
        query = dnslib.DNSRecord.question(name, "A")
        sock_answer = _send(query, ("127.0.0.1", self.port), source)
        return dnslib.DNSRecord.parse(sock_answer)

    def cache(self) -> list[dict[str, object]]:
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["cache", "list", "--socket", str(self.socket),
                             "--output", "json"]) == 0
        return json.loads(out.getvalue())


def _send(query: dnslib.DNSRecord, server: tuple[str, int], source: str) -> bytes:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3)
        sock.sendto(query.pack(), server)
        return sock.recvfrom(65535)[0]


@pytest.fixture
def setup(knot_server: knot.KnotServer, tmp_path: Path) -> Setup:
    port = knot.free_port(("127.0.0.1",))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "web.yaml").write_text(policy(port))
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    return Setup(port, knot_server.listen[0][1], policies, tmp_path / "state",
                 tmp_path / "admin.sock", tmp_path / "audit.jsonl")


def _wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_decisions_cache_and_audit(setup: Setup) -> None:
    with setup.agent():
        assert [str(r.rdata) for r in setup.ask("api.demo.test").rr] == ["203.0.113.10"]
        assert setup.ask("db.demo.test").header.rcode == 5  # REFUSED: no rule allows
        assert setup.ask("api.demo.test", STRANGER).header.rcode == 2  # unknown source
        rows = setup.cache()
        assert [(r["endpoint"], r["name"], r["ips"], r["source"]) for r in rows] == [
            ("demo/web", "api.demo.test.", ["203.0.113.10"], "lookup")]
        assert 250 < rows[0]["ttl"] <= 330  # TTL 300 plus the 10 % headroom
    records = [json.loads(line) for line in setup.audit.read_text().splitlines()]
    for record in records:
        validate(record)
    assert [r["verdict"] for r in records] == ["allowed", "denied", "no-endpoint"]
    assert records[0]["endpoint"]["name"] == "web"


def test_reload_applies_valid_changes_and_rejects_garbage(setup: Setup) -> None:
    policy = setup.policies / "web.yaml"
    with setup.agent() as agent:
        assert setup.ask("db.demo.test").header.rcode == 5
        policy.write_text(policy.read_text().replace(
            "              - matchName: www.demo.test\n",
            "              - matchName: www.demo.test\n              - matchName: db.demo.test\n"))
        assert _wait_for(lambda: setup.ask("db.demo.test").header.rcode == 0)
        policy.write_text("spec: [not, a, policy\n")
        assert _wait_for(lambda: any("rejected" in line for line in agent.log))
        assert setup.ask("db.demo.test").header.rcode == 0  # the previous version serves on
        assert setup.ask("api.demo.test").rr


def test_snapshot_survives_a_clean_stop_and_a_kill(setup: Setup) -> None:
    with setup.agent() as agent:
        setup.ask("www.demo.test")
    assert agent.stop() == 0
    assert (setup.state / snapshot.FILE_NAME).exists()
    with setup.agent() as agent:
        rows = setup.cache()
        assert [(r["name"], r["ips"]) for r in rows] == [("www.demo.test.", ["203.0.113.10"])]
        agent.stop(signal.SIGKILL)
    with setup.agent():
        assert [r["name"] for r in setup.cache()] == ["www.demo.test."]  # the last snapshot


def test_an_unwritable_state_directory_is_logged_and_dns_goes_on(
        setup: Setup, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    setup.state = blocker / "state"
    agent = setup.agent()
    agent.args = [*agent.args, "--state-snapshot-interval", "0.2"]
    with agent:
        assert setup.ask("api.demo.test").rr
        assert _wait_for(lambda: any("snapshot: cannot write" in line for line in agent.log))
        assert setup.ask("www.demo.test").rr  # DNS keeps working
    assert agent.stop() == 0


def _snapshots(metrics_port: int) -> dict[str, float]:
    """``fqdnproxy_cache_snapshots_total`` by result, scraped from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3) as reply:
        text = reply.read().decode()
    found = {"ok": 0.0, "error": 0.0}
    for line in text.splitlines():
        if line.startswith("fqdnproxy_cache_snapshots_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('result="')[1].split('"')[0]] = float(value)
    return found


def _snapshot_names(state: Path) -> set[str]:
    """The names in the snapshot file (orjson raises on a partial or corrupt one)."""
    import orjson

    document = orjson.loads((state / snapshot.FILE_NAME).read_bytes())
    return {name for _, name, _, _ in document["entries"]}


@pytest.mark.root
def test_a_full_state_directory_is_logged_and_counted_and_dns_goes_on(
        setup: Setup, tmp_path: Path) -> None:
    """The state directory on a 256 KiB tmpfs, filled: every snapshot fails with ENOSPC, is
    logged and counted, leaves no temporary file and never replaces the last good snapshot;
    DNS is answered and learned throughout; once space is freed the next snapshot succeeds."""
    from tests.support import tmpfs

    metrics_port = knot.free_port(("127.0.0.1",))
    with tmpfs.tmpfs(tmp_path / "state", "256k") as state:
        setup.state = state
        agent = setup.agent()
        agent.args = [*agent.args, "--state-snapshot-interval", "0.2",
                      "--metrics-listen", f"127.0.0.1:{metrics_port}"]
        with agent:
            assert setup.ask("api.demo.test").rr
            assert _wait_for(lambda: (state / snapshot.FILE_NAME).exists()
                             and _snapshot_names(state) == {"api.demo.test."})

            filler = tmpfs.fill(state)
            assert _wait_for(lambda: _snapshots(metrics_port)["error"] >= 1)
            good = (state / snapshot.FILE_NAME).read_bytes()  # no write can succeed from here
            failed = _snapshots(metrics_port)["error"]
            assert [str(r.rdata) for r in setup.ask("www.demo.test").rr][-1] == "203.0.113.10"
            assert _wait_for(lambda: _snapshots(metrics_port)["error"] >= failed + 3)
            assert any("snapshot: cannot write" in line and "No space left on device" in line
                       for line in agent.log)
            # The last good snapshot is still there, whole; the failed writes left nothing.
            assert _snapshot_names(state) == {"api.demo.test."}
            assert (state / snapshot.FILE_NAME).read_bytes() == good
            assert sorted(p.name for p in state.iterdir()) == sorted([snapshot.FILE_NAME,
                                                                      filler.name])
            # DNS is answered and learned while the snapshots fail.
            assert setup.ask("api.demo.test").rr and setup.ask("www.demo.test").rr
            assert setup.ask("db.demo.test").header.rcode == 5
            assert {r["name"] for r in setup.cache()} == {"api.demo.test.", "www.demo.test."}

            written = _snapshots(metrics_port)["ok"]
            filler.unlink()
            assert _wait_for(lambda: _snapshots(metrics_port)["ok"] > written)
            assert _snapshot_names(state) == {"api.demo.test.", "www.demo.test."}
            assert _wait_for(lambda: any("snapshot: written again" in line
                                         for line in agent.log))
        assert agent.stop() == 0


def test_garbage_policies_under_load_change_nothing(setup: Setup) -> None:
    import threading

    policy = setup.policies / "web.yaml"
    good = policy.read_text()
    results: list[int] = []

    def load() -> None:
        for _ in range(3000):  # about as long as the four swaps below
            try:
                results.append(setup.ask("api.demo.test").header.rcode)
            except OSError:
                results.append(-1)  # no answer

    # The per-client rate limit would refuse this one client's 3,000 queries past its burst.
    with setup.agent("--dns-rate-limit-qps", "0") as agent:
        worker = threading.Thread(target=load)
        worker.start()
        for garbage in ("spec: [not, a, policy\n", "", "apiVersion: cilium.io/v2\nkind: Cilium",
                        good.replace("matchName: api.demo.test", "matchName: '*bad*'")):
            policy.write_text(garbage)
            time.sleep(0.4)  # two reload intervals
        worker.join()
        rejected = sum("rejected" in line for line in agent.log)
    assert rejected >= 3
    assert results == [0] * len(results)  # every query answered NOERROR by the old policy
