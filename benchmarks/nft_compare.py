"""The nftables comparison for the datapath figure (issue 8, item 3).

What an nftables set lookup of the same size costs on the same packets. There is no
BPF_PROG_TEST_RUN for nftables, so the cost is measured as a difference: inside the benchmark's
namespace a veth takes routes to the probe destinations (its peer drops what arrives),
a C program (udp_blast.c) sends the same UDP datagrams round-robin to the same PROBES
destinations bench_datapath.py probes (spread over N addresses 10.0.0.0+i, 2001:db8:100::+i),
and the thread's CPU time per packet is read twice:

    baseline    table inet fqpnft, an output chain (policy accept) with no rule, set of N elements
    with rules  the same chain holding LOOKUPS rules `ip daddr != @s4 drop` (`ip6 daddr` for
                IPv6): each datagram is looked up LOOKUPS times, hits, and goes on

(with rules - baseline) / LOOKUPS is one rule's cost per packet: the set lookup plus nftables'
rule evaluation; LOOKUPS rules make that signal larger than the send path's noise. Rounds pair
a baseline with a with-rules blast; the figure is the median over the pairs. A counter check
first proves every datagram hits the set.
"""

from __future__ import annotations

import ipaddress
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "udp_blast.c"
PROBES = 64
LOOKUPS = 16  # rules per chain, each one set lookup: the signal is 16x a single lookup's
DEV, PEER, MAC = "fqpnft0", "fqpnft1", "02:00:00:00:00:02"
TABLE = """table inet fqpnft {
    set s4 { type ipv4_addr; }
    set s6 { type ipv6_addr; }
    chain out { type filter hook output priority 0; policy accept; }
}
"""


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def _fill(workdir: Path, name: str, addresses: list[str]) -> None:
    path = workdir / f"{name}.nft"
    with open(path, "w") as f:
        f.write(f"flush set inet fqpnft {name}\n")
        for i in range(0, len(addresses), 20_000):
            f.write(f"add element inet fqpnft {name} {{ {', '.join(addresses[i:i + 20_000])} }}\n")
    subprocess.run(["nft", "-f", str(path)], check=True)
    path.unlink()


def _blast(binary: Path, packets: int, probes: list[str]) -> float:
    out = subprocess.run([str(binary), str(packets), *probes], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run(workdir: Path, sizes: list[int], quick: bool = False) -> dict[str, Any]:
    """ns per packet without and with the set-lookup rule, per size and family."""
    workdir.mkdir(parents=True, exist_ok=True)
    if shutil.which("gcc") is None:
        return {"error": "gcc not found: udp_blast.c cannot be built"}
    binary = workdir / "udp_blast"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(SOURCE)], check=True)
    packets, rounds = (100_000, 3) if quick else (300_000, 7)
    # A veth whose peer drops what arrives (the MAC is not its own); static neighbours, so no
    # ARP or ND is in the path.
    for cmd in (["ip", "link", "add", DEV, "type", "veth", "peer", "name", PEER],
                ["ip", "link", "set", DEV, "up"], ["ip", "link", "set", PEER, "up"],
                ["ip", "addr", "add", "192.0.2.1/24", "dev", DEV],
                ["ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", DEV, "nodad"],
                ["ip", "neigh", "add", "192.0.2.2", "lladdr", MAC, "dev", DEV, "nud", "permanent"],
                ["ip", "-6", "neigh", "add", "2001:db8:1::2", "lladdr", MAC, "dev", DEV, "nud", "permanent"],
                ["ip", "route", "add", "10.0.0.0/8", "via", "192.0.2.2", "dev", DEV],
                ["ip", "-6", "route", "add", "2001:db8:100::/48", "via", "2001:db8:1::2", "dev", DEV]):
        subprocess.run(cmd, check=True)
    _nft(TABLE)
    rows = []
    try:
        for size in sizes:
            for version, set_name, match in ((4, "s4", "ip daddr"), (6, "s6", "ip6 daddr")):
                base = ipaddress.ip_address("10.0.0.0" if version == 4 else "2001:db8:100::")
                addresses = [str(base + i) for i in range(size)]
                probes = addresses[:: max(1, size // PROBES)][:PROBES]
                _fill(workdir, set_name, addresses)
                _nft(f"add rule inet fqpnft out {match} @{set_name} counter accept\n")
                _blast(binary, 1000, probes)
                listing = subprocess.run(["nft", "list", "chain", "inet", "fqpnft", "out"],
                                         capture_output=True, text=True, check=True).stdout
                hits = int(listing.split("counter packets ")[1].split()[0])
                _nft("flush chain inet fqpnft out\n")
                base_ns, rule_ns = [], []
                rules = "".join(f"add rule inet fqpnft out {match} != @{set_name} drop\n"
                                for _ in range(LOOKUPS))
                for _ in range(rounds):
                    base_ns.append(_blast(binary, packets, probes))
                    _nft(rules)
                    rule_ns.append(_blast(binary, packets, probes))
                    _nft("flush chain inet fqpnft out\n")
                diffs = sorted((r - b) / LOOKUPS for b, r in zip(base_ns, rule_ns))
                row = {"entries": size, "family": f"IPv{version}", "baseline_ns": statistics.median(base_ns),
                       "with_rule_ns": statistics.median(rule_ns), "rule_ns": statistics.median(diffs),
                       "rule_ns_min": diffs[0], "rule_ns_max": diffs[-1],
                       "counter_hits_of_1000": hits, "rounds_baseline": base_ns, "rounds_rule": rule_ns}
                rows.append(row)
                print(f"  nft {size:>9,} IPv{version}: baseline {row['baseline_ns']:.0f} ns, with "
                      f"{LOOKUPS} rules {row['with_rule_ns']:.0f} ns, one rule {row['rule_ns']:+.1f} ns "
                      f"(rounds {diffs[0]:+.1f} .. {diffs[-1]:+.1f}) "
                      f"(counter {hits}/1000)", flush=True)
                _nft(f"flush set inet fqpnft {set_name}\n")
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "fqpnft"], check=False)
        subprocess.run(["ip", "link", "del", DEV], check=False)
    return {"packets_per_round": packets, "rounds": rounds, "probes": PROBES, "rows": rows}


def section(data: dict[str, Any], bpf_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The results page's section, with the BPF new-UDP figure of the same size beside it."""
    if "error" in data:
        return {"title": "nftables set lookup", "text": f"Not measured: {data['error']}."}
    bpf = {(r["entries"], r["family"]): r.get("new_udp") for r in bpf_rows}
    rows = [(r["entries"], r["family"], r["baseline_ns"], r["with_rule_ns"], r["rule_ns"],
             f"{r['rule_ns_min']:.0f} .. {r['rule_ns_max']:.0f}", bpf.get((r["entries"], r["family"])))
            for r in data["rows"]]
    text = ("Cost of one nftables set lookup of N addresses (a rule `ip daddr != @set drop`, "
            "`ip6 daddr` for IPv6, which every probe hits) on UDP datagrams to the same 64 probe "
            "destinations bench_datapath.py uses: thread CPU time per datagram sent with sendmmsg "
            f"through the output hook to a veth whose peer drops it, with no rule and with {LOOKUPS} "
            f"such rules; the figure is (with - without) / {LOOKUPS}, median of {data['rounds']} "
            f"paired rounds of {data['packets_per_round']:,} datagrams. Not the same instrument as "
            "BPF_PROG_TEST_RUN (which times the whole program, no syscall): this one includes "
            "nftables' per-rule evaluation, and its noise is a whole send path's (1-2 µs a datagram "
            "on this VM); the rounds column shows the spread. The BPF column is "
            "bench_datapath.py's new-UDP figure (endpoint lookup, ct miss, allow lookup, counter) "
            "for the same size.")
    return {"title": "nftables set lookup on the same packets (ns per packet)", "text": text,
            "headers": ["entries", "family", "send, no rule", f"send, {LOOKUPS} rules",
                        "one set lookup", "its rounds", "BPF new UDP (whole program)"],
            "rows": rows, "command": "sudo .venv/bin/python benchmarks/run.py --only datapath"}
