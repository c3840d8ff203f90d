"""``make demo``: fqdnproxy in explicit mode in front of a real knot server, on loopback.

It starts knot with the demo zone, starts ``fqdnproxy run`` forwarding to it, asks a scripted
set of questions through the proxy, and prints what each got next to what was expected, then the
audit records the proxy wrote. Everything runs on 127.0.0.1 and is stopped at the end.
(The full sandbox demo with pods, policies and the datapath replaces this when the lab lands.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dnslib

from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess


@dataclass(frozen=True)
class Step:
    """One scripted question and what the demo zone says it must get."""

    name: str
    qtype: str
    protocol: str
    expected_rcode: str
    expected: tuple[str, ...]
    what: str


STEPS = (
    Step("api.demo.test", "A", "udp", "NOERROR", ("203.0.113.10",), "a plain name"),
    Step("api.demo.test", "AAAA", "udp", "NOERROR", ("2001:db8::10",), "IPv6 address"),
    Step("www.demo.test", "A", "udp", "NOERROR",
         ("web.demo.test.", "api.demo.test.", "203.0.113.10"), "a CNAME chain"),
    Step("many.demo.test", "A", "tcp", "NOERROR",
         tuple(f"203.0.113.{i}" for i in range(100, 120)), "20 addresses over TCP"),
    Step("absent.demo.test", "A", "udp", "NXDOMAIN", (), "a name that does not exist"),
)


@dataclass(frozen=True)
class Outcome:
    step: Step
    rcode: str
    answers: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return (self.rcode == self.step.expected_rcode
                and sorted(self.answers) == sorted(self.step.expected))


def ask(address: tuple[str, int], step: Step) -> Outcome:
    """Send one step's question to the proxy and read the answer."""
    query = dnslib.DNSRecord.question(step.name, step.qtype)
    raw = query.send(address[0], address[1], tcp=step.protocol == "tcp", timeout=3)
    reply = dnslib.DNSRecord.parse(raw)
    answers = tuple(str(rr.rdata) for rr in reply.rr)
    return Outcome(step, dnslib.RCODE.get(reply.header.rcode), answers)


def _short(values: tuple[str, ...], limit: int = 3) -> str:
    if not values:
        return "-"
    shown = ", ".join(values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


def print_table(outcomes: list[Outcome]) -> None:
    header = f"{'#':>2}  {'query':<24} {'proto':<5} {'expected':<32} {'got':<32} ok"
    print(header)
    print("-" * len(header))
    for index, outcome in enumerate(outcomes, 1):
        step = outcome.step
        expected = f"{step.expected_rcode} {_short(step.expected, 1)}"
        got = f"{outcome.rcode} {_short(outcome.answers, 1)}"
        print(f"{index:>2}  {step.name + ' ' + step.qtype:<24} {step.protocol:<5} "
              f"{expected:<32.32} {got:<32.32} {'yes' if outcome.ok else 'NO'}")


def print_audit(path: Path) -> None:
    print(f"\nAudit log ({path}), one JSON object per exchange; the first record in full:")
    lines = path.read_text().splitlines() if path.exists() else []
    if lines:
        print(json.dumps(json.loads(lines[0]), indent=2))
    print("\nAll records, abridged:")
    for line in lines:
        record = json.loads(line)
        query = record["query"]
        print(f"  {record['time']}  {record['type']:<6} {record['protocol']}  "
              f"{query['name']:<20} {query['type']:<5} {record['verdict']:<8} "
              f"{record['rcode'] or '-':<9} {len(record['answers'])} answers "
              f"{record['latency_ms']} ms")


def run_demo(workdir: Path) -> bool:
    """Run every step; True if each got what it expected."""
    port = knot.free_port(("127.0.0.1",))
    audit = workdir / "audit.jsonl"
    print(f"Starting knot (demo.test zone) on 127.0.0.1:{port} ...")
    with knot.KnotServer(listen=[("127.0.0.1", port)], workers=1):
        agent = AgentProcess(["--dns-listen", "127.0.0.1:0", "--upstream-servers",
                              f"127.0.0.1:{port}", "--audit-path", str(audit),
                              "--metrics-listen", "", "--state-admin-socket", ""])
        with agent:
            address = agent.address("udp", "127.0.0.1")
            print(f"fqdnproxy (explicit mode) listening on {address[0]}:{address[1]}, "
                  f"forwarding to knot\n")
            outcomes = [ask(address, step) for step in STEPS]
        print_table(outcomes)
        print("\nAgent log:")
        for line in agent.log:
            print(f"  {line}")
        print_audit(audit)
    ok = all(outcome.ok for outcome in outcomes)
    print("\nDemo " + ("passed: every answer was as expected." if ok else "FAILED: see above."))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqdnproxy.lab.demo", description=__doc__)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fqdnproxy-demo-") as workdir:
        return 0 if run_demo(Path(workdir)) else 1


if __name__ == "__main__":
    sys.exit(main())
