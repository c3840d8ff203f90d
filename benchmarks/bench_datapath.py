"""Datapath micro-benchmark: ns per packet of fqdn_egress with BPF_PROG_TEST_RUN.

    sudo .venv/bin/python benchmarks/bench_datapath.py [--sizes 1000,100000,1000000]

For each size N, N /32 (or /128) entries for one enforced endpoint go in with batched updates,
then packets to 64 different allowed destinations run REPEAT times each in the kernel; the
figure is the kernel's mean ns per run. The program is built with FQDN_RECORD_FLOWS=0 so every
run takes the new-flow path (endpoint lookup, ct miss, exact-hash hit, counters): the cost a
first packet pays. "established" is the production build, where every run after the first hits
`ct`. Runs on a private bpffs; needs root.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import struct
import tempfile
from pathlib import Path

from fqdnproxy.datapath import bpfsys, egress
from fqdnproxy.datapath.allowmap import AllowEntry, PortRange
from fqdnproxy.datapath.maps import EndpointFlags

SRC4, SRC6 = "192.0.2.10", "2001:db8:1::10"
REPEAT = 200_000
PROBES = 64


def _packet(src: str, dst: str, dport: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, s.packed, d.packed)
        eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s.packed, d.packed)
        eth = b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd"
    return eth + ip + tcp


def _destinations(version: int, n: int) -> list[ipaddress._BaseAddress]:
    base = ipaddress.ip_address("10.0.0.0" if version == 4 else "2001:db8:100::")
    return [base + i for i in range(n)]


def measure(size: int, version: int, record_flows: bool, bpffs: Path) -> float:
    pin_dir = bpffs / f"bench-{size}-{version}-{int(record_flows)}"
    options = egress.Options(allow_max=max(size, 1024), record_flows=record_flows)
    with egress.EgressDatapath.load(pin_dir, options, bpffs=bpffs) as dp:
        dp.set_endpoint(SRC4 if version == 4 else SRC6, 1, EndpointFlags.ENFORCE_EGRESS)
        dests = _destinations(version, size)
        ports = (PortRange(6, 443, 443),)
        dp.upsert_allows([AllowEntry(1, ipaddress.ip_network(d), 0, ports) for d in dests])
        # A CIDR rule too, so the trie is not empty (it is not consulted on an exact hit).
        dp.upsert_allows([AllowEntry(1, "198.51.100.0/24" if version == 4 else "2001:db8:ff::/48")])
        step = max(1, size // PROBES)
        figures = []
        for d in dests[::step][:PROBES]:
            packet = _packet(SRC4 if version == 4 else SRC6, str(d), 443)
            retval, ns = bpfsys.prog_test_run(dp.prog_fd, packet, REPEAT)
            assert retval == 0, f"packet to {d} was dropped ({retval})"
            figures.append(ns)
    for f in pin_dir.iterdir():
        f.unlink()
    pin_dir.rmdir()
    return statistics.median(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bpffs = Path(tmp)
        bpfsys.mount_bpffs(bpffs)
        try:
            print(f"{'entries':>9} {'family':>6} {'new flow ns':>12} {'established ns':>15}")
            base: dict[int, float] = {}
            for size in sizes:
                for version in (4, 6):
                    new = measure(size, version, False, bpffs)
                    est = measure(size, version, True, bpffs)
                    base.setdefault(version, new)
                    print(f"{size:>9} {'IPv' + str(version):>6} {new:>12.0f} {est:>15.0f}"
                          f"   ({new / base[version]:.2f}x of {sizes[0]})", flush=True)
        finally:
            bpfsys.umount(bpffs)


if __name__ == "__main__":
    main()
