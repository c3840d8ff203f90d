"""The bodies of ``fqdnproxy policy check`` and ``fqdnproxy policy explain``.

They return results and render them as text or JSON; ``cli.py`` maps results to exit codes.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from fqdnproxy import endpoints
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.policy import engine, load, match

Output = Literal["table", "json"]
DNS_PORT = 53


class CommandError(FqdnproxyError):
    """Invalid command arguments."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Every problem and warning found in the checked files."""

    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    files: tuple[str, ...]
    policies: int
    endpoints: int | None

    @property
    def ok(self) -> bool:
        return not self.problems


def check(paths: Sequence[str | Path], endpoints_file: str | Path | None = None) -> CheckResult:
    """Load every policy under ``paths`` (and the inventory, if given), listing every problem."""
    report = load.check_paths(paths)
    problems = [str(p) for p in report.errors]
    count = None
    if endpoints_file is not None:
        try:
            count = len(endpoints.load_inventory(endpoints_file))
        except endpoints.EndpointsError as error:
            problems.extend(error.problems)
    return CheckResult(tuple(problems), tuple(str(w) for w in report.warnings), report.files,
                       len(report.policies), count)


def render_check(result: CheckResult, output: Output) -> str:
    if output == "json":
        return json.dumps({"ok": result.ok, "problems": list(result.problems),
                           "warnings": list(result.warnings), "files": list(result.files),
                           "policies": result.policies, "endpoints": result.endpoints}, indent=2)
    lines = [f"error: {p}" for p in result.problems] + [f"warning: {w}" for w in result.warnings]
    summary = f"{len(result.files)} files, {result.policies} policies"
    if result.endpoints is not None:
        summary += f", {result.endpoints} endpoints"
    if result.ok:
        lines.append(f"ok: {summary}")
    else:
        lines.append(f"{len(result.problems)} problems in {summary}")
    return "\n".join(lines)


def parse_server(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); the port defaults to 53."""
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise CommandError(f"--server {text}: expected [IPv6]:PORT")
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(text, port_text)
    try:
        return endpoints.normalize_ip(host), port
    except ValueError:
        raise CommandError(f"--server {text}: {host!r} is not an IP address") from None


def _port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise CommandError(f"--server {text}: {port_text!r} is not a port from 1 to 65535")
    return int(port_text)


def explain(policies: Sequence[str | Path], endpoints_file: str | Path, endpoint: str, query: str,
            server: str | None = None, protocol: str = "UDP") -> dict[str, Any]:
    """The verdict on one query of one endpoint, with the rule and the ports learned IPs get.

    Raises: PolicyError, EndpointsError, CommandError.
    """
    policy_set = load.load_paths(policies)
    registry = endpoints.load_inventory(endpoints_file)
    namespace, sep, name = endpoint.partition("/")
    if not sep:
        raise CommandError(f"--endpoint {endpoint}: expected NAMESPACE/NAME")
    subject = registry.by_name(namespace, name)
    if subject is None:
        raise CommandError(f"--endpoint {endpoint}: not in {endpoints_file}")
    try:
        normalized = match.validate_name(query.rstrip(".") or ".")
    except match.MatchError as error:
        raise CommandError(f"--query: {error}") from None
    if server is None:
        server_ip, port = _default_server(registry, str(endpoints_file))
    else:
        server_ip, port = parse_server(server)
    compiled = engine.PolicyEngine(policy_set, registry).for_endpoint(subject)
    decision = compiled.decide(server_ip, port, protocol.upper(), normalized)
    ports = compiled.select(normalized)
    return {
        "endpoint": subject.to_json(),
        "enforced": compiled.enforced,
        "policies": list(compiled.policies),
        "query": normalized,
        "server": {"ip": server_ip, "port": port, "protocol": protocol.upper()},
        "verdict": "allowed" if decision.allowed else "denied",
        "decision": decision.to_json(),
        "learned_ips_get": ports.to_json() if ports is not None else None,
        "selected_by": [str(r) for r in compiled.selecting(normalized)] if ports is not None else [],
        "warnings": list(policy_set.warnings),
    }


def _default_server(registry: endpoints.EndpointRegistry, label: str) -> tuple[str, int]:
    for candidate in registry:
        if candidate.labels.get("k8s-app") == "kube-dns" or candidate.labels.get("k8s:k8s-app") == "kube-dns":
            return candidate.ips[0], DNS_PORT
    raise CommandError(f"no --server given and no endpoint labelled k8s-app=kube-dns in {label}")


def render_explain(result: dict[str, Any], output: Output) -> str:
    if output == "json":
        return json.dumps(result, indent=2)
    ep = result["endpoint"]
    server = result["server"]
    rule = result["decision"]["rule"]
    rule_text = "-"
    if rule is not None:
        rule_text = f"{rule['file']}: document {rule['document']}: {rule['path']} ({rule['policy']})"
    ports = result["learned_ips_get"]
    rows = [
        ("endpoint", f"{ep['namespace']}/{ep['name']} (id {ep['id']}, "
                     f"{'enforced' if result['enforced'] else 'not enforced'})"),
        ("policies", ", ".join(result["policies"]) or "-"),
        ("query", f"{result['query']} to {_host(server['ip'])}:{server['port']}/{server['protocol']}"),
        ("verdict", result["verdict"]),
        ("rule", rule_text),
        ("reason", result["decision"]["reason"]),
        ("learned IPs", "not allowed (no toFQDNs selects the name)" if ports is None else
         ", ".join(_ports(p) for p in ports)),
    ]
    rows.extend(("selected by", ref) for ref in result["selected_by"])
    rows.extend(("warning", w) for w in result["warnings"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _host(ip: str) -> str:
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


def _ports(item: dict[str, Any]) -> str:
    if item["first"] == 0 and item["last"] == 65535:
        return f"{item['protocol']}/all"
    span = str(item["first"]) if item["first"] == item["last"] else f"{item['first']}-{item['last']}"
    return f"{item['protocol']}/{span}"
