"""``fqdnproxy policy check`` and ``fqdnproxy policy explain`` through ``cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fqdnproxy import cli
from tests.policy.conftest import POLICIES

BAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {}
  egress:
  - toServices: []
  - toFQDNs: [{matchPattern: "*.ex ample.com"}]
  ingress: []
"""
DEMO = ["--policies", str(POLICIES / "demo.yaml"), "--endpoints", str(POLICIES / "endpoints.demo.yaml")]


def test_check_clean_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "check", str(POLICIES / "demo.yaml"), "--endpoints",
                     str(POLICIES / "endpoints.demo.yaml")]) == cli.ExitCode.OK
    assert capsys.readouterr().out == "ok: 1 files, 2 policies, 3 endpoints\n"


def test_check_lists_every_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert cli.main(["policy", "check", str(bad)]) == cli.ExitCode.PROBLEMS_FOUND
    assert capsys.readouterr().out.splitlines() == [
        f"error: {bad}: document 1: spec.egress[0].toServices: toServices is not supported: name the service's "
        "endpoints with toEndpoints or its addresses with toCIDR",
        f'error: {bad}: document 1: spec.egress[1].toFQDNs[0].matchPattern: "*.ex ample.com" contains " "; '
        "only letters, digits and - _ . * are allowed",
        f"warning: {bad}: document 1: spec.ingress: not enforced: fqdnproxy enforces egress only",
        "2 problems in 1 files, 0 policies",
    ]


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert cli.main(["policy", "check", str(bad), str(POLICIES / "demo.yaml"), "--output", "json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and len(result["problems"]) == 2 and result["policies"] == 2
    assert cli.main(["policy", "check", str(POLICIES), "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_check_empty_directory_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "check", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"error: {tmp_path}: no policies found: no policy files (*.yaml, *.yml); an empty policy set would stop "
        "enforcement for every endpoint",
        "1 problems in 0 files, 0 policies"]


def test_explain_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "explain", *DEMO, "--endpoint", "demo/frontend", "--query", "blocked.demo.test"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "endpoint     demo/frontend (id 10, enforced)",
        "policies     demo/frontend",
        "query        blocked.demo.test. to 198.51.100.53:53/UDP",
        "verdict      denied",
        f"rule         {POLICIES / 'demo.yaml'}: document 1: spec.egressDeny[0].toFQDNs[0] (demo/frontend)",
        "reason       denied by egressDeny toFQDNs matchName: blocked.demo.test",
        "learned IPs  not allowed (no toFQDNs selects the name)",
    ]


def test_explain_json_with_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "explain", *DEMO, "--endpoint", "demo/frontend", "--query", "API.demo.test",
                     "--server", "[2001:db8:100::53]:53", "--protocol", "tcp", "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "allowed"
    assert result["server"] == {"ip": "2001:db8:100::53", "port": 53, "protocol": "TCP"}
    assert result["decision"]["rule"]["path"] == "spec.egress[0].toPorts[0].rules.dns[0]"
    assert result["learned_ips_get"] == [{"protocol": "TCP", "first": 80, "last": 80},
                                         {"protocol": "TCP", "first": 443, "last": 443}]
    assert cli.main(["policy", "explain", *DEMO, "--endpoint", "demo/backend", "--query", "db.demo.test",
                     "--server", "203.0.113.1:53", "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["verdict"], result["decision"]["reason"]) == ("denied", "no rule allows")


@pytest.mark.parametrize("extra,message", [
    (["--endpoint", "demo", "--query", "a.b"], "--endpoint demo: expected NAMESPACE/NAME"),
    (["--endpoint", "demo/nobody", "--query", "a.b"], "--endpoint demo/nobody: not in"),
    (["--endpoint", "demo/frontend", "--query", "a b"], '--query: "a b" contains " "'),
    (["--endpoint", "demo/frontend", "--query", "a.b", "--server", "dns:53"], "--server dns:53: 'dns' is not"),
    (["--endpoint", "demo/frontend", "--query", "a.b", "--server", "192.0.2.1:99999"], "is not a port"),
])
def test_explain_usage_errors(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "explain", *DEMO, *extra]) == cli.ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_explain_with_invalid_policies_reports_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    code = cli.main(["policy", "explain", "--policies", str(bad), "--endpoints", str(POLICIES / "endpoints.demo.yaml"),
                     "--endpoint", "demo/frontend", "--query", "a.b"])
    assert code == cli.ExitCode.USAGE
    assert "toServices is not supported" in capsys.readouterr().err


def test_policy_without_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy"]) == cli.ExitCode.USAGE
    assert "check" in capsys.readouterr().out
