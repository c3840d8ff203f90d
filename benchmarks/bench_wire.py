"""Micro-benchmark of the DNS wire fast path: ns per parse_query and parse_response.

    .venv/bin/python benchmarks/bench_wire.py [--number 20000] [--repeat 7] [--dnslib]

Messages are built with dnslib (names compressed, as servers send them). Each figure is the best
of ``--repeat`` timeit runs of ``--number`` calls, which is the least disturbed by other load on
the machine; the median is printed beside it. ``--dnslib`` adds ``DNSRecord.parse`` of the same
bytes for scale.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable

from dnslib import AAAA, CNAME, DNSHeader, DNSQuestion, DNSRecord, EDNS0, QTYPE, RR, A

from fqdnproxy.dns import wire


def _query(name: str, qtype: str, edns: bool) -> bytes:
    msg = DNSRecord(DNSHeader(id=0x1234, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        msg.add_ar(EDNS0(udp_len=1232))
    return bytes(msg.pack())


def _response(answers: list[RR]) -> bytes:
    msg = DNSRecord(DNSHeader(id=0x1234, qr=1, rd=1, ra=1), q=DNSQuestion("www.example.com"))
    for answer in answers:
        msg.add_answer(answer)
    msg.add_ar(EDNS0(udp_len=1232))
    return bytes(msg.pack())


def cases() -> list[tuple[str, Callable[[bytes], object], bytes]]:
    """The (label, parser, message) triples measured."""
    chain = [
        RR("www.example.com", QTYPE.CNAME, ttl=300, rdata=CNAME("edge.cdn.example.net")),
        RR("edge.cdn.example.net", QTYPE.A, ttl=60, rdata=A("192.0.2.1")),
        RR("edge.cdn.example.net", QTYPE.AAAA, ttl=60, rdata=AAAA("2001:db8::1")),
    ]
    single = [RR("www.example.com", QTYPE.A, ttl=60, rdata=A("192.0.2.1"))]
    many = [RR("www.example.com", QTYPE.A, ttl=60, rdata=A(f"198.51.100.{i}")) for i in range(100)]
    return [
        ("parse_query  www.example.com A", wire.parse_query, _query("www.example.com", "A", False)),
        ("parse_query  www.example.com A +EDNS", wire.parse_query, _query("www.example.com", "A", True)),
        ("parse_response 1 A", wire.parse_response, _response(single)),
        ("parse_response CNAME+A+AAAA", wire.parse_response, _response(chain)),
        ("parse_response 100 A", wire.parse_response, _response(many)),
    ]


def _noop(data: bytes) -> None:
    """Do nothing: the calibration case."""


def measure(func: Callable[[bytes], object], data: bytes, number: int, repeat: int) -> tuple[float, float]:
    """Return (best, median) ns per call."""
    runs = timeit.repeat(lambda: func(data), number=number, repeat=repeat)
    per_call = [run / number * 1e9 for run in runs]
    return min(per_call), statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per timeit run")
    parser.add_argument("--repeat", type=int, default=7, help="timeit runs; the best is reported")
    parser.add_argument("--dnslib", action="store_true", help="also time dnslib's DNSRecord.parse")
    args = parser.parse_args()
    print(f"{'case':40s} {'bytes':>5s} {'best ns':>10s} {'median ns':>10s}")
    # A calibration line: what one empty Python call costs here, to compare machines.
    best, median = measure(_noop, b"", args.number, args.repeat)
    print(f"{'(empty Python call)':40s} {0:5d} {best:10.0f} {median:10.0f}")
    for label, func, data in cases():
        number = max(1, args.number // 20) if "100" in label else args.number
        best, median = measure(func, data, number, args.repeat)
        print(f"{label:40s} {len(data):5d} {best:10.0f} {median:10.0f}")
        if args.dnslib:
            best, median = measure(DNSRecord.parse, data, max(1, number // 10), args.repeat)
            print(f"{'  dnslib DNSRecord.parse':40s} {len(data):5d} {best:10.0f} {median:10.0f}")


if __name__ == "__main__":
    main()
