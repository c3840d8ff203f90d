"""First DNS throughput figure: dnsperf straight at knot, then through fqdnproxy, in one run.

    .venv/bin/python benchmarks/bench_forward.py [--seconds 10] [--clients 4] [--outstanding 200]

Both runs use the same query file (a mix of demo.test names: A, AAAA, a CNAME chain, 20-address
answers, NXDOMAIN), the same knot server (one UDP worker, so it is not the bottleneck's rival for
the two cores), and the same dnsperf settings. fqdnproxy runs as in production: uvloop, the audit
log written to a file, metrics on. The harness proper (dnsmasq comparisons, fixed-rate latency)
is benchmarks/run.py's job; this is the foundation's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess

QUERIES = [
    "api.demo.test A", "api.demo.test AAAA", "www.demo.test A", "web.demo.test A",
    "db.demo.test A", "dual.demo.test AAAA", "many.demo.test A", "short.demo.test A",
    "absent.demo.test A", "txt.demo.test TXT", "v6only.demo.test AAAA", "world.demo.test A",
]


@dataclass
class Result:
    target: str
    qps: float
    sent: int
    completed: int
    lost: int
    latency_avg_ms: float
    latency_max_ms: float
    command: str


def run_dnsperf(port: int, queries: Path, seconds: int, clients: int, outstanding: int,
                target: str) -> Result:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
               "-l", str(seconds), "-c", str(clients), "-q", str(outstanding), "-t", "2"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        if not match:
            raise RuntimeError(f"dnsperf output lacks {pattern!r}:\n{out}")
        return float(match.group(1))

    return Result(
        target=target,
        qps=number(r"Queries per second:\s+([\d.]+)"),
        sent=int(number(r"Queries sent:\s+(\d+)")),
        completed=int(number(r"Queries completed:\s+(\d+)")),
        lost=int(number(r"Queries lost:\s+(\d+)")),
        latency_avg_ms=number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        latency_max_ms=number(r"Average Latency \(s\):.*max ([\d.]+)") * 1000,
        command=" ".join(command),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--outstanding", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fqdnproxy-bench-") as tmp:
        workdir = Path(tmp)
        queries = workdir / "queries.txt"
        queries.write_text("\n".join(QUERIES) + "\n")
        port = knot.free_port(("127.0.0.1",))
        with knot.KnotServer(listen=[("127.0.0.1", port)], workers=1):
            results.append(run_dnsperf(port, queries, args.seconds, args.clients,
                                       args.outstanding, "knot directly"))
            with AgentProcess(["--dns-listen", "127.0.0.1:0", "--upstream-servers",
                               f"127.0.0.1:{port}", "--audit-path", str(workdir / "audit.jsonl"),
                               "--metrics-listen", "", "--state-admin-socket", ""]) as agent:
                proxy_port = agent.address("udp", "127.0.0.1")[1]
                results.append(run_dnsperf(proxy_port, queries, args.seconds, args.clients,
                                           args.outstanding, "fqdnproxy -> knot"))
    machine = f"{os.cpu_count()} cores, Linux {platform.release()}, Python {sys.version.split()[0]}"
    print(f"machine: {machine}")
    print(f"{'target':<20} {'qps':>10} {'lost':>8} {'avg ms':>8} {'max ms':>8}")
    for r in results:
        print(f"{r.target:<20} {r.qps:>10.0f} {r.lost:>8} {r.latency_avg_ms:>8.3f} "
              f"{r.latency_max_ms:>8.3f}")
    print(f"command: {results[-1].command} (port differs per target)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine,
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
