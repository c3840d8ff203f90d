"""DNS comparison (issue 8, item 2): the same dnsperf load against knot, dnsmasq and fqdnproxy.

Runs inside the benchmark's network namespace (benchmarks/run.py puts it there): every process
below listens on that namespace's loopback, and dnsperf sends from CLIENT_IP, which the policy's
inventory lists as an enforced endpoint. Targets, one at a time, each with the same query file:

    knot directly            the authoritative upstream (one UDP worker, as in bench_forward.py)
    dnsmasq                  forwarding to knot, cache off
    dnsmasq + nftset         the same, writing every A/AAAA answer into nftables sets
    python floor             python_floor.py: a bare uvloop forwarder (no parsing, policy, audit),
                             what any Python proxy pays before doing its own work
    fqdnproxy                policy decided per query, every new answer written to the BPF map
    fqdnproxy, 2 workers     the same with dns.workers 2 (README, "DNS workers")
    knot directly (again)    the upstream once more, at the fixed rate only (see ``run``)

Each runs at full load (-c 8 -q 200) and at a fixed 5,000 queries per second (-Q 5000), with
``-v`` so that percentiles come from every answered query's own latency. Eight client sockets,
as a node's pods have many: the DNS workers' listeners spread each query at random
(dns/reuseport.py), so the workers' share does not depend on them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dnslib

from benchmarks import bench_forward, report
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess

CLIENT_IP = "198.51.100.10"  # dnsperf's source: the policy's enforced endpoint
PROXY_IP = "198.51.100.53"  # fqdnproxy listens here, port 53: the inventory's kube-dns service
KNOT_PORT, DNSMASQ_PORT, NFTSET_PORT, FLOOR_PORT = 5300, 5301, 5302, 5303
CLIENTS, OUTSTANDING, FIXED_QPS = 8, 200, 5000
WORKERS = 2  # the DNS workers of the "fqdnproxy, 2 workers" rows
WORKERS_TARGET = f"fqdnproxy, {WORKERS} workers"

# Names added to a copy of demo.test for the mix: more distinct names, a CNAME to a 4-address
# answer, and two names the policy refuses (one by an egressDeny, one in another zone).
EXTRA_ZONE = """
; added by benchmarks/dns_compare.py
cdn         300     IN  CNAME   edge.demo.test.
edge        300     IN  A       203.0.113.40
edge        300     IN  A       203.0.113.41
edge        300     IN  A       203.0.113.42
edge        300     IN  A       203.0.113.43
edge        300     IN  AAAA    2001:db8::40
denied      300     IN  A       203.0.113.67
""" + "".join(f"svc{i:<8} 300     IN  A       203.0.113.{150 + i}\n"
              f"svc{i:<8} 300     IN  AAAA    2001:db8::{150 + i:x}\n" for i in range(16))

# The mix: bench_forward.QUERIES (A, AAAA, CNAME chain, 20 addresses, NXDOMAIN, TXT) plus more
# plain names, the CNAME to 4 addresses, and refused names (blocked/denied: egressDeny; an
# example.org name: no rule allows it, and knot is not authoritative for it).
QUERIES = [
    *bench_forward.QUERIES,
    *(f"svc{i}.demo.test {'A' if i % 3 else 'AAAA'}" for i in range(16)),
    "cdn.demo.test A", "cdn.demo.test AAAA", "api.demo.test A", "www.demo.test A",
    "many.demo.test A", "nothere.demo.test AAAA",
    "blocked.demo.test A", "denied.demo.test A", "denied.demo.test AAAA", "www.example.org A",
]
REFUSED_NAMES = ("blocked.demo.test", "denied.demo.test", "www.example.org")

INVENTORY = f"""endpoints:
- {{namespace: bench, name: client, id: 1, labels: {{app: client}}, ips: [{CLIENT_IP}]}}
- {{namespace: kube-system, name: kube-dns, kind: service, labels: {{k8s-app: kube-dns}}, ips: [{PROXY_IP}]}}
"""

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.demo.test"
        - matchPattern: "*.learn.test"
  - toFQDNs:
    - matchPattern: "*.demo.test"
    - matchPattern: "*.learn.test"
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
  egressDeny:
  - toFQDNs:
    - matchName: blocked.demo.test
    - matchName: denied.demo.test
"""


def write_inputs(workdir: Path) -> dict[str, Path]:
    """The zone copy, the query file, the policy and the inventory, in ``workdir``."""
    zones = workdir / "zones"
    zones.mkdir(parents=True, exist_ok=True)
    zone = zones / "demo.test.zone"
    zone.write_text(knot.DEMO_ZONE.read_text() + EXTRA_ZONE)
    queries = workdir / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    inventory = workdir / "endpoints.yaml"
    inventory.write_text(INVENTORY)
    return {"zone": zone, "queries": queries, "policy": policy, "inventory": inventory}


def wait_answers(ip: str, port: int, timeout: float = 15.0, name: str = "api.demo.test") -> None:
    """Wait until ``ip``:``port`` answers an A query for ``name`` (any rcode).

    Raises:
        TimeoutError: no answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    query = dnslib.DNSRecord.question(name, "A")
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(query.pack(), (ip, port))
                if dnslib.DNSRecord.parse(sock.recv(65535)).header.id == query.header.id:
                    return
            except (OSError, dnslib.DNSError):
                pass
    raise TimeoutError(f"nothing answers on {ip}:{port}")


@contextlib.contextmanager
def dnsmasq(port: int, upstream: int, workdir: Path, nftset: bool) -> Iterator[list[str]]:
    """dnsmasq forwarding to knot with its cache off (optionally with nftset); yields its argv."""
    argv = ["dnsmasq", "-k", "--no-resolv", "--no-hosts", "--cache-size=0",
            f"--server=127.0.0.1#{upstream}", "--listen-address=127.0.0.1", "--bind-interfaces",
            f"--port={port}", "--user=root", "--pid-file=",
            # Default is 150: with 800 queries outstanding dnsmasq would drop most of them.
            "--dns-forward-max=1024", f"--log-facility={workdir / f'dnsmasq-{port}.log'}"]
    if nftset:
        argv.append("--nftset=/demo.test/4#inet#fqpbench#allowed4,6#inet#fqpbench#allowed6")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_answers("127.0.0.1", port)
        yield argv
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def python_floor(port: int, upstream: int) -> Iterator[list[str]]:
    """benchmarks/python_floor.py on 127.0.0.1:``port``, forwarding to ``upstream``; its argv."""
    argv = [sys.executable, str(Path(__file__).with_name("python_floor.py")),
            f"127.0.0.1:{port}", f"127.0.0.1:{upstream}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_answers("127.0.0.1", port)
        yield ["python_floor.py", *argv[2:]]
    finally:
        proc.kill()
        proc.wait()


NFT_TABLE = """table inet fqpbench {
    set allowed4 { type ipv4_addr; timeout 1h; }
    set allowed6 { type ipv6_addr; timeout 1h; }
}
"""


def nft_set_size(name: str) -> int:
    """Elements in set ``name`` of table inet fqpbench."""
    out = subprocess.run(["nft", "list", "set", "inet", "fqpbench", name],
                         capture_output=True, text=True, check=True).stdout
    elements = out.partition("elements = {")[2].partition("}")[0]
    return len([e for e in elements.split(",") if e.strip()])


def dnsperf(ip: str, port: int, queries: Path, seconds: int, rate: int | None,
            workdir: Path) -> tuple[report.DnsperfRun, str]:
    """One dnsperf run from CLIENT_IP; the parsed result and the command line."""
    command = ["dnsperf", "-s", ip, "-p", str(port), "-a", CLIENT_IP, "-d", str(queries),
               "-l", str(seconds), "-c", str(CLIENTS), "-q", str(OUTSTANDING), "-t", "2", "-v"]
    if rate:
        command += ["-Q", str(rate)]
    out_path = workdir / "dnsperf.out"
    with open(out_path, "w") as out:  # a file, not a pipe: -v writes a line per query
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    return report.parse_dnsperf(out_path.read_text()), " ".join(command)


@dataclass
class Row:
    target: str
    load: str  # "full" or "5000 q/s"
    qps: float
    sent: int
    lost: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    rcodes: dict[str, int]
    command: str
    server: str  # how the target was started


FIXED_LOAD = f"{FIXED_QPS} q/s"
KNOT_AGAIN = "knot directly (again)"  # the upstream's fixed-rate run repeated after fqdnproxy's


def _measure(target: str, ip: str, port: int, server: str, inputs: dict[str, Path],
             seconds: int, workdir: Path, full: bool = True) -> list[Row]:
    rows = []
    loads = (("full", None), (FIXED_LOAD, FIXED_QPS)) if full else ((FIXED_LOAD, FIXED_QPS),)
    for load, rate in loads:
        run, command = dnsperf(ip, port, inputs["queries"], seconds, rate, workdir)
        rows.append(Row(target, load, run.qps, run.sent, run.lost, run.p50_ms, run.p99_ms,
                        run.p999_ms, run.rcodes, command, server))
        print(f"  {target:<18} {load:<9} {run.qps:>10,.0f} q/s  lost {run.lost:>6}  "
              f"p50 {run.p50_ms:.3f}  p99 {run.p99_ms:.3f}  p99.9 {run.p999_ms:.3f} ms", flush=True)
    return rows


def run(workdir: Path, bpffs: Path, seconds: int) -> dict[str, Any]:
    """Every target at both loads; the rows plus what proves the map/set writes happened."""
    inputs = write_inputs(workdir)
    rows: list[Row] = []
    extra: dict[str, Any] = {"queries": QUERIES, "refused_names": list(REFUSED_NAMES)}
    with knot.KnotServer(listen=[("127.0.0.1", KNOT_PORT)], zones=[inputs["zone"]], workers=1):
        rows += _measure("knot directly", "127.0.0.1", KNOT_PORT,
                         f"knotd (udp-workers 1) serving {inputs['zone'].name}", inputs, seconds, workdir)
        with dnsmasq(DNSMASQ_PORT, KNOT_PORT, workdir, nftset=False) as argv:
            rows += _measure("dnsmasq", "127.0.0.1", DNSMASQ_PORT, " ".join(argv), inputs,
                             seconds, workdir)
        subprocess.run(["nft", "-f", "-"], input=NFT_TABLE, text=True, check=True)
        try:
            with dnsmasq(NFTSET_PORT, KNOT_PORT, workdir, nftset=True) as argv:
                rows += _measure("dnsmasq + nftset", "127.0.0.1", NFTSET_PORT, " ".join(argv),
                                 inputs, seconds, workdir)
            extra["nftset_elements"] = {s: nft_set_size(s) for s in ("allowed4", "allowed6")}
        finally:
            subprocess.run(["nft", "delete", "table", "inet", "fqpbench"], check=False)
        with python_floor(FLOOR_PORT, KNOT_PORT) as argv:
            rows += _measure("python floor", "127.0.0.1", FLOOR_PORT, " ".join(argv), inputs,
                             seconds, workdir)
        agent_args = proxy_args(inputs, workdir, bpffs / "dns", KNOT_PORT)
        with AgentProcess(agent_args, start_timeout=60) as agent:
            rows += _measure("fqdnproxy", PROXY_IP, 53, "fqdnproxy run " + " ".join(agent_args),
                             inputs, seconds, workdir)
        shutil.rmtree(bpffs / "dns", ignore_errors=True)
        own = workdir / "workers"  # its own state directory: no snapshot of the run before
        own.mkdir(exist_ok=True)
        agent_args = proxy_args(inputs, own, bpffs / "dns-workers", KNOT_PORT,
                                ("--dns-workers", str(WORKERS)))
        with AgentProcess(agent_args, start_timeout=60) as agent:
            agent.wait_for(f"[worker {WORKERS - 1}]: forwarding to")
            rows += _measure(WORKERS_TARGET, PROXY_IP, 53,
                             "fqdnproxy run " + " ".join(agent_args), inputs, seconds, workdir)
        shutil.rmtree(bpffs / "dns-workers", ignore_errors=True)
        # The added p99 is a difference of two tails measured minutes apart. A stall of the
        # machine during the upstream's run raises its tail only (once to 1.78 ms against its
        # usual 0.06, making fqdnproxy's added latency -1.3 ms), so the upstream's fixed-rate
        # run is repeated now and the target is judged against the lower of its two p99s.
        rows += _measure(KNOT_AGAIN, "127.0.0.1", KNOT_PORT,
                         f"knotd (udp-workers 1) serving {inputs['zone'].name}", inputs, seconds,
                         workdir, full=False)
    extra["rows"] = [asdict(r) for r in rows]
    return extra


def proxy_args(inputs: dict[str, Path], workdir: Path, pin_dir: Path, upstream: int,
               extra: tuple[str, ...] = ()) -> list[str]:
    """`fqdnproxy run` flags: production settings, policy, datapath on a private pin dir."""
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    return ["--dns-listen", f"{PROXY_IP}:53", "--upstream-servers", f"127.0.0.1:{upstream}",
            "--audit-path", str(workdir / "audit.jsonl"), "--metrics-listen", "127.0.0.1:9153",
            "--state-admin-socket", "", "--state-directory", str(state),
            "--policy-directory", str(inputs["policy"]), "--policy-endpoints", str(inputs["inventory"]),
            # One dnsperf source is one "client": the per-client limit (1,000 q/s) would refuse
            # the load. dnsmasq has no such limit; neither does this run.
            "--dns-rate-limit-qps", "0",
            "--datapath-enabled", "true", "--datapath-pin-dir", str(pin_dir), *extra]


def ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_dnsmasq`` (qps, p50, p99, p99.9 ratios) to each row, dnsmasq of the same load."""
    for row in rows:
        base = next(r for r in rows if r["target"] == "dnsmasq" and r["load"] == row["load"])
        row["vs_dnsmasq"] = {k: report.ratio(row[k], base[k])
                             for k in ("qps", "p50_ms", "p99_ms", "p999_ms")}


def notes(rows: list[dict[str, Any]]) -> str:
    """What a reader must know to read the rows: targets that could not keep the fixed rate."""
    slow = [r for r in rows if r["load"] != "full" and r["qps"] < 0.98 * FIXED_QPS]
    if not slow:
        return ""
    return (" " + ", ".join(f"{r['target']} ({r['qps']:,.0f} q/s)" for r in slow)
            + f" could not keep up with {FIXED_QPS:,} q/s: its fixed-rate latencies are those of an "
            "overloaded server (queries wait in dnsperf's outstanding window), not the cost it adds "
            "at that rate.")
