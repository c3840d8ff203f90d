"""`make bench`: every benchmark of issue 8, written to benchmarks/results/ and the README.

    sudo .venv/bin/python benchmarks/run.py [--seconds 10] [--quick] [--only dns,datapath,...]

Needs root. The harness creates a network namespace (fqpbench-<hex>), re-executes itself inside
it (`ip netns exec`, which also gives it a private mount namespace for its bpffs), and deletes
the namespace at the end: every server, client and nftables table lives on that namespace's
loopback, nothing in the machine's root namespace. Parts, in order:

    dns       dns_compare.py: knot, dnsmasq, dnsmasq + nftset, a bare Python forwarder (the floor),
              fqdnproxy under one dnsperf load
    datapath  bench_datapath.py (BPF_PROG_TEST_RUN) and nft_compare.py (an nftables set lookup)
    policy    bench_policy.py: decision time at 10, 1,000 and 10,000 selectors
    learn     learn_memory.py: learned entries per second end to end, agent RSS, map memory;
              bench_learn.py: the learn stage alone (parse, learn, kernel write) per answer
    cache     bench_cache.py: the cache alone at 1M entries
    wire      bench_wire.py --dnslib: the DNS wire parser against dnslib

Writes benchmarks/results/latest.json and latest.md and refreshes the README between
<!-- bench:start --> and <!-- bench:end -->. --quick is a smoke test (short runs, small sizes):
its figures say nothing, and it writes quick.json / quick.md and leaves the README alone. --only
writes partial.json / partial.md and leaves the README alone too: the README's table is always
one whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PARTS = ("dns", "datapath", "policy", "learn", "cache", "wire")
PY = ".venv/bin/python"


def machine() -> dict[str, Any]:
    """Cores, CPU model, kernel, Python: what every figure was measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count() or 0, "cpu": model, "kernel": platform.release(),
            "python": sys.version.split()[0]}


def _busy_jiffies() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fqdnproxy", "bpf"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "")


# ---- parts -------------------------------------------------------------------------------------

def part_dns(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks import dns_compare

    data = dns_compare.run(ctx["workdir"] / "dns", ctx["bpffs"], ctx["seconds"])
    rows = data["rows"]
    dns_compare.ratios(rows)
    ctx["json"]["dns"] = data
    s = ctx["seconds"]
    text = (
        f"dnsperf from the policy's endpoint address, {len(data['queries'])}-query mix (A, AAAA, "
        "CNAME chains, a 20-address answer, NXDOMAIN, TXT, names the policy refuses: "
        f"{', '.join(data['refused_names'])}), {s} s per run, -c {dns_compare.CLIENTS} -q "
        f"{dns_compare.OUTSTANDING} for full load and -Q {dns_compare.FIXED_QPS:,} "
        "for the fixed rate; latencies are percentiles of every answered query (`dnsperf -v`). "
        "Upstream: knot (one UDP worker) serving a copy of demo.test. dnsmasq has its cache off and "
        "--dns-forward-max=1024; python floor is benchmarks/python_floor.py, a bare uvloop "
        "forwarder with no parsing, policy, audit or metrics (not a usable proxy: what CPython and "
        "the event loop cost before any work of our own); fqdnproxy runs with policy, the audit log to a file, metrics, the "
        "datapath on a private bpffs and the per-client rate limit off; \"fqdnproxy, "
        f"{dns_compare.WORKERS} workers\" is the same with dns.workers {dns_compare.WORKERS} (README, "
        "\"DNS workers\"; the kernel hands each query to one of them at random). "
        "Ratios are to dnsmasq "
        "(no firewall) at the same load in the same run. knot runs at the fixed rate once more "
        "after fqdnproxy (\"again\"): the p99 fqdnproxy adds is taken over the lower of knot's two "
        "p99s, since a stall of the machine during one run raises only that run's tail.")
    text += dns_compare.notes(rows)
    if "nftset_elements" in data:
        text += f" nftset sets after the runs: {data['nftset_elements']}."
    table_rows = [(r["target"], r["load"], r["qps"], r["lost"], r["p50_ms"], r["p99_ms"], r["p999_ms"],
                   r["vs_dnsmasq"]["qps"], r["vs_dnsmasq"]["p99_ms"]) for r in rows]
    return [{"title": "DNS: queries per second and latency (ms)", "text": text,
             "headers": ["target", "load", "queries/s", "lost", "p50", "p99", "p99.9",
                         "q/s vs dnsmasq", "p99 vs dnsmasq"],
             "rows": table_rows, "command": rows[-1]["command"] + " (port and server differ per target)"}]


def part_datapath(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks import nft_compare

    sizes = ctx["sizes"]
    command = [PY, "benchmarks/bench_datapath.py", "--sizes", ",".join(map(str, sizes))]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    rows = []
    header: list[str] = []
    for line in out.stdout.splitlines():
        words = line.split()
        if words[:2] == ["entries", "family"]:
            header = words[2:]
        elif header and len(words) == len(header) + 2 and words[0].isdigit():
            rows.append({"entries": int(words[0]), "family": words[1],
                         **{k: float(v) for k, v in zip(header, words[2:])}})
    ctx["json"]["datapath"] = {"command": " ".join(command), "rows": rows, "returncode": out.returncode,
                               "stderr_tail": out.stderr[-2000:]}
    sections = []
    if rows:
        sections.append({
            "title": "Datapath: ns per packet (BPF_PROG_TEST_RUN of the tc program)",
            "text": "Columns as bench_datapath.py prints them (its docstring says what each runs); "
                    "median over probes of the best of several rounds.",
            "headers": ["entries", "family", *header],
            "rows": [(r["entries"], r["family"], *(r[k] for k in header)) for r in rows],
            "command": "sudo " + " ".join(command)})
    else:
        sections.append({"title": "Datapath", "text": f"bench_datapath.py failed (exit {out.returncode}):"
                         f" {out.stderr.strip().splitlines()[-1:]}"})
    try:
        nft = nft_compare.run(ctx["workdir"] / "nft", sizes, quick=ctx["quick"])
    except Exception as error:  # keep the BPF figures
        traceback.print_exc()
        nft = {"error": f"{type(error).__name__}: {error}"}
    ctx["json"]["nft"] = nft
    sections.append(nft_compare.section(nft, rows))
    return sections


def part_policy(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    command = [PY, "benchmarks/bench_policy.py", "--json"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ctx["json"]["policy"] = {"command": " ".join(command), "rows": rows}
    return [{"title": "Policy engine: one decision (µs)",
             "text": "One endpoint, one policy whose toFQDNs and rules.dns each hold N selectors "
                     "(names, `*.` and `**.` patterns, mid-label globs); mean of 50,000 calls.",
             "headers": ["selectors", "decide exact", "decide **.", "decide refused", "select", "compile ms"],
             "rows": [(r["selectors"], r["decide_exact_ns"] / 1e3, r["decide_deep_ns"] / 1e3,
                       r["decide_refused_ns"] / 1e3, r["select_ns"] / 1e3, r["compile_ms"]) for r in rows],
             "command": " ".join(command)}]


def part_learn(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks import learn_memory

    data = learn_memory.run(ctx["workdir"] / "learn", ctx["bpffs"], names=ctx["learn_names"],
                            map_entries=ctx["sizes"][-1])
    ctx["json"]["learn"] = data
    answers = 2_000 if ctx["quick"] else 20_000
    command = [PY, "-m", "benchmarks.bench_learn", "--pin-dir", str(ctx["bpffs"] / "learn-stage"),
               "--answers", str(answers)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ctx["json"]["learn_stage"] = {"command": " ".join(command), "output": out}
    stage = {"title": "The learn stage alone (CPU time in one process, kernel allow map)",
             "text": "\n".join(f"- {line}" for line in out.splitlines() if line.strip()),
             "command": " ".join(command)}
    return [*learn_memory.sections(data), stage]


def part_cache(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    entries = 100_000 if ctx["quick"] else 1_000_000
    command = [PY, "benchmarks/bench_cache.py", "--entries", str(entries)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ctx["json"]["cache"] = {"command": " ".join(command), "output": out}
    lines = [line for line in out.splitlines() if line.strip()]
    return [{"title": f"FQDN cache alone at {entries:,} entries",
             "text": "\n".join(f"- {line}" for line in lines), "command": " ".join(command)}]


def part_wire(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    command = [PY, "benchmarks/bench_wire.py", "--dnslib"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ctx["json"]["wire"] = {"command": " ".join(command), "output": out}
    return [{"title": "DNS wire parser (ns per call)", "text": "```\n" + out.strip() + "\n```",
             "command": " ".join(command)}]


# ---- targets -----------------------------------------------------------------------------------

def targets(doc: dict[str, Any]) -> list[report.Target]:
    """Issue 8 item 5, each against this run's figures (None where a part did not run)."""
    from benchmarks import dns_compare

    out = []
    dns = doc.get("dns", {}).get("rows")
    if dns:
        row = {(r["target"], r["load"]): r for r in dns}
        plain, nfts = (row[(t, "full")] for t in ("dnsmasq", "dnsmasq + nftset"))
        # fqdnproxy as one process and, where it ran, with DNS workers: the verdict is the
        # better one's (a deployment picks dns.workers), and the line names both.
        candidates = [(t, row[(t, "full")]) for t in ("fqdnproxy", dns_compare.WORKERS_TARGET)
                      if (t, "full") in row]

        def qps_target(what: str, base: dict[str, Any], goal: float) -> report.Target:
            figures = [(t, r["qps"] / base["qps"], r) for t, r in candidates]
            text = "; ".join(f"{'1 process' if t == 'fqdnproxy' else t.split(', ')[1]}: "
                             f"{r['qps']:,.0f} q/s = {ratio:.2f}x, {r['lost']:,} lost"
                             for t, ratio, r in figures)
            met = any(ratio >= goal and r["lost"] == 0 for _, ratio, r in figures)
            return report.Target(what, text, f"≥ {goal:g}x, 0 lost", met)

        out.append(qps_target("fqdnproxy q/s vs dnsmasq forwarding, no loss", plain, 1.0))
        out.append(qps_target("fqdnproxy q/s vs dnsmasq + nftset, no loss", nfts, 3.0))
        fixed = [k for k in row if k[1] != "full"][0][1]
        # Over the lower of the upstream's fixed-rate p99s (dns_compare.run says why).
        knot = sorted(r["p99_ms"] for (target, load), r in row.items()
                      if load == fixed and target.startswith("knot directly"))
        added = row[("fqdnproxy", fixed)]["p99_ms"] - knot[0]
        out.append(report.Target(
            f"p99 added over knot at {fixed}",
            f"{added:+.3f} ms (knot's p99: {knot[0]:.3f} ms, the lower of its {len(knot)} runs)",
            "≤ 1 ms", added <= 1.0))
    dp = doc.get("datapath", {}).get("rows")
    if dp:
        kinds = [k for k in ("new_tcp", "new_udp", "established") if k in dp[0]]
        big, small = max(r["entries"] for r in dp), min(r["entries"] for r in dp)
        worst = max(r[k] for r in dp if r["entries"] == big for k in kinds)
        growth = max(next(r for r in dp if r["entries"] == big and r["family"] == f)[k]
                     / next(r for r in dp if r["entries"] == small and r["family"] == f)[k]
                     for f in ("IPv4", "IPv6") for k in kinds)
        out.append(report.Target(f"datapath ns/packet at {big:,} entries ({', '.join(kinds)})",
                                 f"worst {worst:.0f} ns, {growth:.2f}x the {small:,} figure",
                                 "≤ 100 ns, ≤ 1.5x", worst <= 100 and growth <= 1.5))
    pol = doc.get("policy", {}).get("rows")
    if pol:
        r = max(pol, key=lambda r: r["selectors"])
        worst = max(r["decide_exact_ns"], r["decide_deep_ns"], r["decide_refused_ns"]) / 1e3
        out.append(report.Target(f"decision at {r['selectors']:,} selectors", f"worst {worst:.1f} µs",
                                 "≤ 10 µs", worst <= 10))
    learn = doc.get("learn")
    if learn:
        rate, with_workers = learn.get("learned_per_s"), learn.get("workers_learned_per_s")
        text = f"{rate:,.0f}/s" if rate else "–"
        if with_workers:
            text = f"1 process: {text}; {dns_compare.WORKERS} workers: {with_workers:,.0f}/s"
        best = max((r for r in (rate, with_workers) if r), default=None)
        out.append(report.Target("learned (endpoint, IP) entries per second, end to end", text,
                                 "≥ 100,000/s", None if best is None else best >= 100_000))
        rss, entries = learn.get("rss_mb"), learn.get("rss_cache_entries") or 0
        dp_rss, dp_entries = learn.get("rss_datapath_mb"), learn.get("rss_datapath_entries") or 0
        over = any(v is not None and v > 250 for v in (rss, dp_rss))
        met = False if over else (True if dp_entries >= 1_000_000 else None)
        out.append(report.Target(
            "agent RSS with 1M cached entries",
            f"no datapath: {rss:,.0f} MB at {entries:,} entries; with the datapath: {dp_rss:,.0f} MB "
            f"at {dp_entries:,} (its allow map holds {learn.get('agent_allow_max', 0):,})",
            "≤ 250 MB", met))
    return out


# ---- the run -----------------------------------------------------------------------------------

def inside(args: argparse.Namespace) -> int:
    """The benchmark proper, in the namespace ``args.inside`` (lo up, addresses added here)."""
    from benchmarks import dns_compare
    from fqdnproxy.datapath import bpfsys

    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{dns_compare.CLIENT_IP}/32", "dev", "lo"],
                ["ip", "addr", "add", f"{dns_compare.PROXY_IP}/32", "dev", "lo"]):
        subprocess.run(cmd, check=True)
    started, busy0 = time.time(), _busy_jiffies()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    quick = args.quick
    only = args.only.split(",") if args.only else list(PARTS)
    doc: dict[str, Any] = {"machine": machine(), "commit": _git_commit(),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "make bench" + (f" (benchmarks/run.py {' '.join(sys.argv[1:-2])})"
                                                      if len(sys.argv) > 3 else ""),
                           "netns": args.inside, "seconds": args.seconds, "sections": [], "not_done": []}
    with tempfile.TemporaryDirectory(prefix="fqpbench-") as tmp:
        workdir = Path(tmp)
        bpffs = workdir / "bpffs"
        bpffs.mkdir()
        bpfsys.mount_bpffs(bpffs)  # private: ip netns exec gave this process its own mount namespace
        ctx = {"workdir": workdir, "bpffs": bpffs, "seconds": args.seconds, "quick": quick, "json": doc,
               "sizes": [1000, 10_000] if quick else [1000, 100_000, 1_000_000],
               "learn_names": 2_000 if quick else 50_000}
        try:
            for part in only:
                print(f"== {part}", flush=True)
                t = time.monotonic()
                try:
                    doc["sections"] += globals()[f"part_{part}"](ctx)
                except Exception as error:  # one broken part must not lose the others' figures
                    traceback.print_exc()
                    doc["not_done"].append(f"{part}: failed ({type(error).__name__}: {error})")
                print(f"   {part} took {time.monotonic() - t:.0f} s", flush=True)
        finally:
            bpfsys.umount(bpffs)
    busy1 = _busy_jiffies()
    own = os.times()
    own_s = own.user + own.system + own.children_user + own.children_system
    tick = os.sysconf("SC_CLK_TCK")
    total_s = (busy1[1] - busy0[1]) / tick
    other = max(0.0, (busy1[0] - busy0[0]) / tick - own_s)
    detail = {"loadavg_before": load0, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
              "other_cpu_share": other / total_s if total_s else 0.0, "wall_s": time.time() - started}
    doc["noise_detail"] = detail
    doc["noise"] = (f"While it ran, other work on the machine used {detail['other_cpu_share']:.0%} of "
                    f"the CPU time (load average {' '.join(load0)} before, "
                    f"{' '.join(detail['loadavg_after'])} after); the run took {detail['wall_s'] / 60:.1f} min.")
    doc["targets"] = [t.__dict__ for t in targets(doc)]
    write(doc, "quick" if quick else "partial" if args.only else "latest")
    return 0


def write(doc: dict[str, Any], stem: str) -> None:
    """``stem``.json and ``stem``.md; the README only from a full run ("latest"): a quick or
    partial run (``--quick``, ``--only``) must not replace the full table with part of one."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    markdown = report.render_markdown(doc)
    (RESULTS / f"{stem}.md").write_text("# Benchmarks\n\n" + markdown)
    print(markdown)
    if stem == "latest":
        README.write_text(report.refresh_readme(README.read_text(), markdown))
        print(f"wrote {RESULTS}/{stem}.json, {stem}.md and the README's Benchmarks table")
    else:
        print(f"wrote {RESULTS}/{stem}.json and {stem}.md (README untouched)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each dnsperf run (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke test: short runs, small sizes")
    parser.add_argument("--only", help=f"comma-separated parts ({','.join(PARTS)})")
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # set on the re-exec in the namespace
    args = parser.parse_args()
    if args.quick and args.seconds == 10:
        args.seconds = 2
    if os.geteuid() != 0:
        print("benchmarks/run.py needs root (network namespace, BPF, nftables)", file=sys.stderr)
        return 2
    if args.inside:
        return inside(args)
    name = f"fqpbench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--inside", name]
        return subprocess.run(["ip", "netns", "exec", name, *argv], cwd=ROOT).returncode
    finally:
        # Processes left in the namespace (a crash) would keep it alive: kill what is in it.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
