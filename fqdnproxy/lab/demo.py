"""``make demo``: the whole product in network namespaces, one scripted scenario, then cleanup.

It builds the lab (``fqdnproxy lab up``: pods frontend and backend, a node running the agent with
policies/demo.yaml and the eBPF datapath, a world with knot and echo servers), plays the
scenario (scenario.py) over IPv4 and IPv6, prints each step's expected and actual outcome and
the audit records that match it, and tears the lab down. ``--keep`` leaves it up and prints
commands to try by hand. Exits 1 if any step did not go as expected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.lab import lab as lab_mod
from fqdnproxy.lab import scenario, topology

AUDIT_WAIT = 3.0  # seconds for the agent's writer thread to flush the last records


def print_table(results: list[scenario.Result]) -> None:
    """Each step: family, pod, action, expected, actual, ok."""
    header = (f"{'#':>3}  {'IP':<4} {'pod':<9} {'step':<45} {'expected':<24} {'actual':<24} ok")
    print(header)
    print("-" * len(header))
    for result in results:
        actual = result.actual + (f" ({result.drops})" if result.drops else "")
        print(f"{result.number:>3}  v{result.family:<3} {result.pod:<9} {result.action:<45.45} "
              f"{result.expected:<24.24} {actual:<24.24} {'yes' if result.ok else 'NO'}")


def _abridged(record: dict[str, Any]) -> str:
    if record.get("type") == "drop":
        destination = record["destination"]
        return (f"drop    {record['protocol']} -> {destination['ip']}:{destination['port']} "
                f"{record['verdict']} ({record['reason']})")
    query = record["query"]
    allowed = ", ".join(f"{a['ip']} {a['ports']} until {a['expires'][11:19]}"
                        for a in record.get("allowed", ()))
    answers = ", ".join(a["data"] for a in record.get("answers", ()))
    text = (f"{record['type']:<7} {record['protocol']} {query['name']} {query['type']} -> "
            f"{record['server']['ip'] if record.get('server') else '-'}: {record['verdict']}, "
            f"{record['rcode'] or 'no answer'}")
    if answers:
        text += f" [{answers}]"
    if allowed:
        text += f"; map: {allowed}"
    return text + f"\n{'':>14}reason: {record['reason']}"


def read_audit(path: Path, results: list[scenario.Result]) -> list[dict[str, Any]]:
    """The audit log's records, once every lookup of ``results`` has its record (or after
    AUDIT_WAIT: records are written by a thread)."""
    deadline = time.monotonic() + AUDIT_WAIT
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        records = [json.loads(line) for line in lines if line.strip()]
        lookups = [r for r in results if r.query is not None]
        if all(scenario.records_for(r, records) for r in lookups) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def print_audit(path: Path, results: list[scenario.Result], records: list[dict[str, Any]]) -> None:
    """Per step, the audit records that match it; the first one in full."""
    print(f"\nAudit records ({path}) matching each step; the first in full:")
    first = next((found[0] for r in results if (found := scenario.records_for(r, records))), None)
    if first is not None:
        print(json.dumps(first, indent=2))
    for result in results:
        found = scenario.records_for(result, records)
        if not found and result.query is None:
            continue  # connections: drop records appear when the agent writes them
        where = f"v{result.family} #{result.number:<3}"
        for record in found or [None]:
            who = f"{result.pod} {result.source_ip}"
            print(f"  {where} {who:<27} " + (_abridged(record) if record else "NO RECORD"))


def print_try_by_hand(lab: lab_mod.Lab) -> None:
    """Commands to explore the running lab."""
    fe, be = lab.plan.pod("frontend"), lab.plan.pod("backend")
    cli = f"{sys.prefix}/bin/fqdnproxy"
    print(f"""
The lab is up ({lab.dns_mode} DNS). Try, as root:
  ip netns exec {fe.namespace} dig api.demo.test                 # allowed: 203.0.113.10
  ip netns exec {fe.namespace} dig blocked.demo.test             # REFUSED (egressDeny)
  ip netns exec {be.namespace} dig www.demo.test                 # REFUSED (no rule allows)
  ip netns exec {fe.namespace} dig @2001:db8:100::53 www.demo.test AAAA   # a CNAME chain, IPv6
  ip netns exec {fe.namespace} curl -m 2 -sv telnet://203.0.113.10:443 </dev/null   # connects
  ip netns exec {fe.namespace} curl -m 2 -sv telnet://{topology.UNRESOLVED[0]}:443 </dev/null   # dropped
  {cli} cache list --socket {lab.admin_socket}
  {cli} map dump --pin-dir {lab.pin_dir}
  tail -f {lab.audit_path}
  ip netns exec {topology.NODE} curl -s http://{lab_mod.METRICS}/metrics | grep ^fqdnproxy_
  {cli} lab status
  {cli} lab down                                     # removes everything""")


def run_demo(settings: lab_mod.LabSettings, families: tuple[int, ...], keep: bool) -> bool:
    """Build the lab, play the scenario, print it; True if every step was as expected."""
    if lab_mod.status(settings.state_dir).lines[0] != "lab: down (nothing found)":
        print("Removing the lab left from an earlier run ...")
        lab_mod.down(settings.state_dir, say=lambda _text: None)
    print(f"Building the lab in network namespaces (state in {settings.state_dir}) ...")
    lab = lab_mod.up(settings, say=lambda text: print(f"  {text}"))
    try:
        print(f"  policies {lab.policies}, inventory {lab.inventory}\n")
        results: list[scenario.Result] = []
        for family in families:
            print(f"Scenario over IPv{family} (DNS asked at {lab.plan.dns_server(family)}) ...")
            results += scenario.run(lab, family, say=print)
            failed = sum(not result.ok for result in results if result.family == family)
            print(f"  {failed} of the IPv{family} steps did not go as expected" if failed else
                  f"  every IPv{family} step went as expected")
        print()
        print_table(results)
        print_audit(lab.audit_path, results, read_audit(lab.audit_path, results))
    finally:
        if keep:
            print_try_by_hand(lab)
        else:
            print("\nTearing the lab down ...")
            lab_mod.down(settings.state_dir, say=lambda _text: None)
    ok = all(result.ok for result in results)
    print("\nDemo " + ("passed: every step went as expected." if ok else
                       "FAILED: the steps marked NO did not go as expected."))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqdnproxy.lab.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="leave the lab up and print commands to try by hand")
    parser.add_argument("--family", choices=("4", "6", "both"), default="both",
                        help="IP family of the scenario (default both)")
    parser.add_argument("--dns-mode", choices=("transparent", "explicit"),
                        help="how pods' DNS reaches the proxy (default transparent when the "
                             "agent has it)")
    args = parser.parse_args(argv)
    settings = lab_mod.LabSettings()
    if args.dns_mode:
        settings = lab_mod.LabSettings(dns_mode=args.dns_mode)
    families = (4, 6) if args.family == "both" else (int(args.family),)
    try:
        with lab_mod.exclusive():
            return 0 if run_demo(settings, families, args.keep) else 1
    except FqdnproxyError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
