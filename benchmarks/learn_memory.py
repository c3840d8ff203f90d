"""Learning end to end and memory (issue 8, item 4): entries per second, agent RSS, map memory.

Runs inside the benchmark's namespace (benchmarks/run.py). knot serves learn.test, NAMES names of
IPS_PER_NAME A records each, every address distinct (10.0.0.0/8), TTL one hour. fqdnproxy, with
the same policy as the DNS comparison (``*.learn.test`` allowed and selected) and the datapath on
a private bpffs, answers one dnsperf pass over every name (``-n 1``, -c 4 -q 200): each answer is
new, so each of its IPS_PER_NAME addresses becomes an (endpoint, IP) entry in the cache and the
kernel allow map before the answer is released. Reported:

- learned entries per second: entries in the pinned allow maps after the pass / dnsperf's run
  time (the end-to-end figure), and the cache's own count sampled from /metrics;
- the agent's CPU time (user + system, /proc/PID/stat) during the pass per learned entry: the
  agent's single thread is the bottleneck, and this figure moves less than the wall clock when
  other work shares the machine;
- the agent's RSS (/proc/PID/status VmRSS) with the cache full;
- kernel map memory: ``memlock`` of every pinned map (/proc/self/fdinfo of its fd), for the
  agent's maps, and for a datapath loaded with ``allow_max`` = MAP_ENTRIES and filled with that
  many /32 entries (the agent's compiled map size may be smaller than 1M).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import dns_compare
from fqdnproxy.datapath import bpfsys
from fqdnproxy.lab import knot
from fqdnproxy.lab.agent_process import AgentProcess

IPS_PER_NAME = 20
TTL = 3600
METRICS = "http://127.0.0.1:9153/metrics"


def write_zone(path: Path, names: int) -> None:
    """learn.test: ``names`` names (n0 ...) of IPS_PER_NAME distinct A records each."""
    lines = ["$ORIGIN learn.test.", f"$TTL {TTL}",
             "@ 3600 IN SOA ns1.learn.test. hostmaster.learn.test. 1 3600 600 86400 60",
             "@ 3600 IN NS ns1.learn.test.", "ns1 3600 IN A 192.0.2.53"]
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for n in range(names):
        first = base + n * IPS_PER_NAME
        lines += [f"n{n} IN A {ipaddress.IPv4Address(first + i)}" for i in range(IPS_PER_NAME)]
    path.write_text("\n".join(lines) + "\n")


def map_census(pin_dir: Path, count: bool = True) -> list[dict[str, Any]]:
    """Every map pinned in ``pin_dir``: type, max entries, entries (walked), memlock bytes."""
    out = []
    for path in sorted(pin_dir.iterdir()):
        try:
            fd = bpfsys.obj_get(path)
        except OSError:
            continue  # a pinned program, or something else that is not a map
        try:
            try:
                info = bpfsys.map_info(fd)
            except OSError:
                continue
            fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
            memlock = re.search(r"memlock:\s+(\d+)", fdinfo)
            row = {"map": path.name, "type": info.type, "max_entries": info.max_entries,
                   "memlock_bytes": int(memlock.group(1)) if memlock else None}
            if count and info.type in (1, 5, 9, 10, 11):  # hash, percpu hash, lru, lru percpu, lpm
                row["entries"] = _count(fd, info.key_size)
            out.append(row)
        finally:
            os.close(fd)
    return out


def _count(fd: int, key_size: int) -> int:
    key, nxt = (ctypes.c_ubyte * key_size)(), (ctypes.c_ubyte * key_size)()
    total, current = 0, None
    while bpfsys.next_key(fd, current, nxt):
        total += 1
        ctypes.memmove(key, nxt, key_size)
        current = key
    return total


def _metric(name: str) -> float | None:
    try:
        text = urllib.request.urlopen(METRICS, timeout=2).read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used: /proc/PID/stat utime + stime."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes(pid: int) -> list[int]:
    """``pid`` and its children (an agent's DNS workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout  # exit status 1: no children
    return [pid, *(int(child) for child in out.split())]


def agent_pass(workdir: Path, bpffs: Path, names: int, inputs: dict[str, Path],
               datapath: bool, allow_max: int = 0, workers: int = 1) -> dict[str, Any]:
    """One agent (``workers`` DNS workers), one dnsperf pass over the first ``names`` names;
    the figures of that pass (CPU and RSS summed over the workers)."""
    queries = workdir / f"learn-queries-{names}.txt"
    queries.write_text("".join(f"n{n}.learn.test A\n" for n in range(names)))
    pin_dir = bpffs / ("learn" if datapath else "unused")
    extra = ("--cache-max-names-per-endpoint", str(names * 2), "--cache-max-entries",
             str(max(1_000_000, names * IPS_PER_NAME)), "--audit-path", "",
             "--cache-gc-interval", "60s", "--state-snapshot-interval", "1h")
    # Each pass has its own state directory: the cache-only agent must not restore the datapath
    # agent's snapshot (1M entries) before learning the same names again.
    own = workdir / ("pass-datapath" if datapath else "pass-cache-only")
    if workers > 1:
        own, pin_dir = own.with_name(f"{own.name}-workers"), pin_dir.with_name(f"{pin_dir.name}-workers")
        extra += ("--dns-workers", str(workers))
    own.mkdir(exist_ok=True)
    args = dns_compare.proxy_args(inputs, own, pin_dir, dns_compare.KNOT_PORT, extra)
    if not datapath:
        args[args.index("--datapath-enabled") + 1] = "false"
    elif allow_max:
        args += ["--datapath-allow-max", str(allow_max)]
    samples: list[tuple[float, float]] = []
    with AgentProcess(args, start_timeout=60) as agent:
        if workers > 1:
            agent.wait_for(f"[worker {workers - 1}]: forwarding to")
        processes = _processes(agent.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                value = _metric("fqdnproxy_cache_entries")
                if value is not None:
                    samples.append((time.monotonic(), value))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        command = ["dnsperf", "-s", dns_compare.PROXY_IP, "-p", "53", "-a", dns_compare.CLIENT_IP,
                   "-d", str(queries), "-n", "1", "-c", str(dns_compare.CLIENTS), "-q", "200",
                   "-t", "5"]
        cpu_before = sum(map(_cpu_s, processes))
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        cpu_s = sum(map(_cpu_s, processes)) - cpu_before  # the pass's share, scrapes included
        stop.set()
        sampler.join()
        time.sleep(1)  # let the last answers' writes finish before counting
        run_s = float(re.search(r"Run time \(s\):\s+([\d.]+)", out).group(1))
        rcodes = re.search(r"Response codes:\s+(.*)", out)
        result: dict[str, Any] = {
            "command": " ".join(command), "agent": "fqdnproxy run " + " ".join(args), "run_s": run_s,
            "qps": float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)),
            "lost": int(re.search(r"Queries lost:\s+(\d+)", out).group(1)),
            "rcodes": rcodes.group(1) if rcodes else "", "datapath": datapath, "agent_cpu_s": cpu_s,
            "cache_entries": _metric("fqdnproxy_cache_entries"),
            "rss_mb": sum(map(_rss_mb, processes)), "workers": workers,
        }
        if len(samples) >= 2:
            peak = max((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[1:]))
            result["cache_peak_per_s"] = peak
        if datapath:
            census = map_census(pin_dir)
            result["maps"] = census
            result["map_entries"] = sum(m.get("entries", 0) for m in census if m["map"].startswith("allow"))
            result["map_memlock_mb"] = sum(m["memlock_bytes"] or 0 for m in census) / 2**20
    return result


def full_map_memory(bpffs: Path, entries: int) -> dict[str, Any]:
    """memlock of every map of a datapath whose allow maps hold ``entries`` /32 entries."""
    from fqdnproxy.datapath import egress
    from fqdnproxy.datapath.allowmap import AllowEntry, PortRange

    pin_dir = bpffs / "memory"
    ports = (PortRange(6, 443, 443),)
    base = ipaddress.ip_address("10.0.0.0")
    with egress.EgressDatapath.load(pin_dir, egress.Options(allow_max=entries), bpffs=bpffs) as dp:
        for start in range(0, entries, 65536):
            dp.upsert_allows([AllowEntry(1, ipaddress.ip_network(base + i), 0, ports)
                              for i in range(start, min(entries, start + 65536))])
        census = map_census(pin_dir)
    for f in pin_dir.iterdir():
        f.unlink()
    pin_dir.rmdir()
    return {"entries": entries, "maps": census,
            "memlock_mb": sum(m["memlock_bytes"] or 0 for m in census) / 2**20}


def run(workdir: Path, bpffs: Path, names: int, map_entries: int) -> dict[str, Any]:
    """The learning pass with the datapath, a cache-only pass, and the full-map memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = dns_compare.write_inputs(workdir)
    zone = workdir / "zones" / "learn.test.zone"
    write_zone(zone, names)
    from fqdnproxy.datapath import egress

    # The datapath agent's allow maps are sized (datapath.allow_max) for every entry of the pass
    # plus some room: past their size a learn fails and the answer is SERVFAIL.
    capacity = max(egress.Options().allow_max, int(names * IPS_PER_NAME * 1.05))
    dp_names = names
    data: dict[str, Any] = {"names": names, "datapath_names": dp_names, "ips_per_name": IPS_PER_NAME,
                            "agent_allow_max": capacity}
    with knot.KnotServer(listen=[("127.0.0.1", dns_compare.KNOT_PORT)], zones=[zone], workers=1,
                         start_timeout=300):
        data["with_datapath"] = agent_pass(workdir, bpffs, dp_names, inputs, datapath=True,
                                           allow_max=capacity)
        data["cache_only"] = agent_pass(workdir, bpffs, names, inputs, datapath=False)
        data["with_workers"] = agent_pass(workdir, bpffs, dp_names, inputs, datapath=True,
                                          allow_max=capacity, workers=dns_compare.WORKERS)
    w = data["with_workers"]
    data["workers_learned_per_s"] = w["map_entries"] / w["run_s"] if w.get("map_entries") else None
    data["workers_cpu_us_per_entry"] = (w["agent_cpu_s"] / w["map_entries"] * 1e6
                                        if w.get("map_entries") else None)
    d = data["with_datapath"]
    data["learned_per_s"] = d["map_entries"] / d["run_s"] if d.get("map_entries") else None
    # The agent's one thread is what limits the pass, and other load on the machine moves the
    # wall-clock figure: its CPU time per entry is the steadier measure of its own cost.
    data["agent_cpu_us_per_entry"] = (d["agent_cpu_s"] / d["map_entries"] * 1e6
                                      if d.get("map_entries") else None)
    c = data["cache_only"]
    data["rss_mb"], data["rss_cache_entries"] = c["rss_mb"], int(c["cache_entries"] or 0)
    data["rss_datapath_mb"], data["rss_datapath_entries"] = d["rss_mb"], int(d["cache_entries"] or 0)
    data["full_map"] = full_map_memory(bpffs, map_entries)
    return data


def sections(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The results page's sections for this part."""
    d, c, f = data["with_datapath"], data["cache_only"], data["full_map"]
    allow = [m for m in d.get("maps", []) if m["map"].startswith("allow")]
    capacity = ", ".join(f"{m['map']} {m['max_entries']:,}" for m in allow)
    rows = [
        ("learned entries/s, end to end (allow-map entries after the pass / dnsperf run time)",
         data["learned_per_s"]),
        ("agent CPU per learned entry (µs: agent user+system CPU during the pass / allow-map entries)",
         data["agent_cpu_us_per_entry"]),
        ("allow-map entries after the pass", d.get("map_entries")),
        ("cache entries after the pass", d["cache_entries"]),
        ("dnsperf pass: queries/s, lost, response codes", f"{d['qps']:,.0f}, {d['lost']:,}, {d['rcodes']}"),
        ("agent RSS after the pass (MB)", d["rss_mb"]),
        ("kernel memory of the agent's pinned maps (MB, memlock)", d.get("map_memlock_mb")),
        ("cache-only pass (no datapath): cache entries, agent RSS (MB)",
         f"{int(c['cache_entries'] or 0):,}, {c['rss_mb']:,.0f}"),
        (f"kernel memory of all maps, allow maps sized and filled to {f['entries']:,} /32s (MB, memlock)",
         f["memlock_mb"]),
    ]
    w = data.get("with_workers")
    if w:
        n = w["workers"]
        rows += [
            ((f"dns.workers {n}: learned entries/s, end to end (entries in all {n} workers' maps "
              "/ dnsperf run time)"), data["workers_learned_per_s"]),
            (f"dns.workers {n}: CPU per learned entry (µs: all workers' CPU / entries)",
             data["workers_cpu_us_per_entry"]),
            (f"dns.workers {n}: allow-map entries after the pass; RSS of all workers (MB)",
             f"{w.get('map_entries') or 0:,}; {w['rss_mb']:,.0f}"),
        ]
    text = (f"One dnsperf pass (`{d['command']}`) over {data['datapath_names']:,} distinct names of "
            f"learn.test, {data['ips_per_name']} distinct IPv4 addresses each (TTL 1 h), through fqdnproxy "
            f"with policy and the datapath, its allow maps sized for the pass with datapath.allow_max "
            f"(pinned capacity: {capacity or 'unknown'}). The agent's RSS after that pass holds the "
            "cache and what bcc and LLVM, which compiled the program, leave in the process. Then the "
            f"same {data['names']:,} names through an agent without the datapath, for the RSS of the "
            "cache alone; then a datapath alone, loaded with allow_max set to the size below and "
            "filled, for the kernel memory at that size. Last, the first pass again with "
            f"dns.workers {dns_compare.WORKERS} (each worker learns what the kernel hands it into its "
            "own map). Agent flags: see latest.json (learn.with_datapath.agent, "
            "learn.with_workers.agent).")
    return [{"title": "Learning end to end, agent and map memory", "text": text,
             "headers": ["figure", "value"], "rows": rows,
             "command": "sudo .venv/bin/python benchmarks/run.py --only learn"}]
