"""Overload: dnsperf at twice the proxy's capacity for 60 s. Memory stays bounded, nothing
crashes, and answers resume within 5 s of the load stopping.

The capacity is measured first, in the same run (dnsperf unpaced for a few seconds), so the
overload stays twice what this agent answers on this machine as the proxy gets faster."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dnslib
import pytest

from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.conftest import require
from tests.integration.test_agent_policy import INVENTORY, policy

SECONDS = int(__import__("os").environ.get("FQDNPROXY_OVERLOAD_SECONDS", "60"))
MIN_RATE = 20_000  # queries/s asked at least, whatever the capacity measured
CAPACITY_SECONDS = 5
QUERIES = ["api.demo.test A", "www.demo.test A", "api.demo.test AAAA", "db.demo.test A"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _answered(port: int) -> bool:
    query = dnslib.DNSRecord.question("api.demo.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(0.5)
        try:
            sock.sendto(query.pack(), ("127.0.0.1", port))
            return dnslib.DNSRecord.parse(sock.recv(65535)).header.id == query.header.id
        except OSError:
            return False


def _capacity(port: int, queries: Path) -> int:
    """Answers per second this agent gives dnsperf unpaced, on this machine, now."""
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", "127.0.0.2", "-d", str(queries),
         "-l", str(CAPACITY_SECONDS), "-c", "4", "-q", "200", "-t", "2"],
        capture_output=True, text=True, check=True).stdout
    return int(float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)))


@pytest.mark.slow
def test_twice_the_capacity_for_a_minute(knot_server: knot.KnotServer, tmp_path: Path) -> None:
    require(shutil.which("dnsperf") is not None, "dnsperf not installed (run `make bootstrap`)")
    port = knot.free_port(("127.0.0.1",))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "web.yaml").write_text(policy(port))
    (tmp_path / "endpoints.yaml").write_text(INVENTORY)
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    with AgentProcess([
        "--dns-listen", f"127.0.0.1:{port}",
        "--upstream-servers", f"127.0.0.1:{knot_server.listen[0][1]}",
        "--policy-directory", str(tmp_path / "policies"),
        "--policy-endpoints", str(tmp_path / "endpoints.yaml"),
        "--state-directory", str(tmp_path / "state"),
        "--state-admin-socket", str(tmp_path / "admin.sock"),
        "--audit-path", str(tmp_path / "audit.jsonl"),
        "--metrics-listen", "", "--dns-rate-limit-qps", "0",
    ]) as agent:
        assert _answered(port)
        before = _rss_mb(agent.pid)
        capacity = _capacity(port, queries)
        rate = max(MIN_RATE, 2 * capacity)
        report = (tmp_path / "dnsperf.out").open("w")  # a file: a pipe would fill and stall it
        perf = subprocess.Popen(
            ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", "127.0.0.2", "-d", str(queries),
             "-Q", str(rate), "-l", str(SECONDS), "-c", "4", "-q", "60000", "-t", "2",
             "-O", "suppress=timeout"], stdout=report, text=True)
        peak = before
        while perf.poll() is None:
            peak = max(peak, _rss_mb(agent.pid))
            time.sleep(0.5)
        report.close()
        out = (tmp_path / "dnsperf.out").read_text()
        stopped = time.monotonic()
        while not _answered(port):
            assert time.monotonic() - stopped < 5.0, "no answer within 5 s of the load stopping"
        resumed = time.monotonic() - stopped
        assert agent._proc is not None and agent._proc.poll() is None  # still running
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    servfail = re.search(r"SERVFAIL (\d+)", out)
    print(f"\noverload: {sent} sent, {completed} answered ("
          f"{servfail.group(1) if servfail else 0} SERVFAIL past the in-flight cap) in {SECONDS} s "
          f"at {rate} q/s asked (capacity measured: {capacity} q/s); "
          f"RSS {before:.0f} -> peak {peak:.0f} MB; answers resumed {resumed:.2f} s after")
    assert completed > 0 and peak - before < 200  # bounded by the in-flight and audit caps
