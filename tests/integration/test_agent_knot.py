"""``fqdnproxy run`` as a process in front of a real knot server (testing tier 2)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dnslib
import pytest

from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess
from tests.integration.test_knot import _knotd_present
from tests.conftest import require
from tests.support.audit_schema import validate


@pytest.fixture(scope="module")
def knot_server() -> Iterator[knot.KnotServer]:
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    port = knot.free_port()
    with knot.KnotServer(listen=[("127.0.0.1", port), ("::1", port)], workers=1) as server:
        yield server


@pytest.fixture
def agent(knot_server: knot.KnotServer, tmp_path: Path) -> Iterator[AgentProcess]:
    port = knot_server.listen[0][1]
    metrics_port = knot.free_port(("127.0.0.1",))
    process = AgentProcess([
        "--dns-listen", "127.0.0.1:0,[::1]:0",
        "--upstream-servers", f"127.0.0.1:{port}",
        "--audit-path", str(tmp_path / "audit.jsonl"),
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--state-directory", str(tmp_path / "state"),
        "--state-admin-socket", str(tmp_path / "admin.sock"),
    ])
    process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    with process:
        yield process


def ask(address: tuple[str, int], name: str, qtype: str, tcp: bool = False) -> dnslib.DNSRecord:
    query = dnslib.DNSRecord.question(name, qtype)
    reply = dnslib.DNSRecord.parse(
        query.send(address[0], address[1], tcp=tcp, timeout=3, ipv6=":" in address[0]))
    assert reply.header.id == query.header.id
    return reply


def rdata(reply: dnslib.DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def test_answers_through_the_proxy_match_knot(agent: AgentProcess) -> None:
    v4 = agent.address("udp", "127.0.0.1")
    v6 = agent.address("udp", "::1")
    assert rdata(ask(v4, "api.demo.test", "A")) == ["203.0.113.10"]
    assert rdata(ask(v6, "api.demo.test", "AAAA")) == ["2001:db8::10"]
    assert rdata(ask(v4, "www.demo.test", "A")) == [
        "web.demo.test.", "api.demo.test.", "203.0.113.10"]
    assert ask(v4, "absent.demo.test", "A").header.rcode == 3  # NXDOMAIN from knot
    assert len(ask(agent.address("tcp", "127.0.0.1"), "many.demo.test", "A", tcp=True).rr) == 20


def test_audit_records_and_metrics_after_a_clean_stop(agent: AgentProcess, tmp_path: Path) -> None:
    v4 = agent.address("udp", "127.0.0.1")
    ask(v4, "www.demo.test", "A")
    with urllib.request.urlopen(agent.metrics_url, timeout=5) as response:  # type: ignore[attr-defined]
        text = response.read().decode()
    assert 'fqdnproxy_queries_total{protocol="udp",qtype="A",verdict="allowed"} 1.0' in text
    assert agent.stop(signal.SIGTERM) == 0
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    for line in lines:
        validate(json.loads(line))
    record = json.loads(lines[-1])
    assert record["type"] == "answer"
    assert record["query"] == {"name": "www.demo.test.", "type": "A", "class": 1,
                               "id": record["query"]["id"]}
    assert record["rcode"] == "NOERROR" and record["verdict"] == "allowed"
    assert record["cnames"] == ["web.demo.test.", "api.demo.test."]
    assert {"name": "api.demo.test.", "type": "A", "ttl": 300, "data": "203.0.113.10"} in \
        record["answers"]
    assert record["time"].endswith("Z") and record["source"]["ip"] == "127.0.0.1"
    assert any("stopped" in line for line in agent.log)


def test_port_in_use_is_a_startup_failure(agent: AgentProcess) -> None:
    ip, port = agent.address("udp", "127.0.0.1")
    second = AgentProcess(["--dns-listen", f"127.0.0.1:{port}", "--metrics-listen", "",
                           "--state-admin-socket", ""],
                          start_timeout=10)
    with pytest.raises(Exception) as raised:
        second.start()
    assert "cannot bind" in str(raised.value)
    assert second.stop() == 3


def test_sighup_reopens_the_audit_file(agent: AgentProcess, tmp_path: Path) -> None:
    v4 = agent.address("udp", "127.0.0.1")
    audit = tmp_path / "audit.jsonl"
    ask(v4, "api.demo.test", "A")
    rotated = tmp_path / "audit.jsonl.1"
    deadline = time.monotonic() + 5
    while not audit.exists() or not audit.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    audit.rename(rotated)  # what logrotate does, then it signals the agent
    agent.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not audit.exists():
        assert time.monotonic() < deadline, "the audit file was not reopened"
        time.sleep(0.05)
    ask(v4, "db.demo.test", "A")
    assert agent.stop() == 0
    assert "api.demo.test." in rotated.read_text()
    assert "db.demo.test." in audit.read_text() and "api.demo.test." not in audit.read_text()
