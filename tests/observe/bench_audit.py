"""Micro-benchmark of the audit log's hot path: µs of CPU per ``JsonLinesAuditLog.emit`` and per
``AuditRecord`` construction, over realistic records.

    .venv/bin/python tests/observe/bench_audit.py [--records 200000] [--repeat 5]

Records are what ``proxy._record`` builds at full DNS load: mostly allowed answers for a few
hundred names drawn with repeats (Zipf-like), so the same ``answers``/``cnames`` tuple objects
recur as they do from the parse cache; 1-4 A/AAAA records, sometimes behind a CNAME; 1-4 allowed
IPs with a fresh expiry; the endpoint's identity dict as ``Endpoint.identity`` returns it (a new
dict per call); some refused queries (no answers, no server). Lines go to /dev/null. The clock is
``time.process_time`` (all threads: the writer's join and write are counted too), each figure the
median of ``--repeat`` runs because other processes share the CPU. Runs against whichever
``fqdnproxy`` is on the path, so the same file measures before and after a change.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from fqdnproxy.dns import wire
from fqdnproxy.endpoints import Endpoint
from fqdnproxy.exchange import AllowedIp
from fqdnproxy.observe import audit
from fqdnproxy.observe.metrics import Metrics

CHUNK = 10_000  # records built per batch, outside the timed region


Answer = tuple[str, tuple[wire.Record, ...], tuple[str, ...]]


def _names(count: int) -> list[Answer]:
    """(name, answers, cnames) as the parse cache hands them out: one tuple object per name."""
    out = []
    for i in range(count):
        name = f"svc{i}.example{i % 7}.com" if i % 50 else f"bücher{i}.example.de"
        records, cnames, owner = [], [], name
        if i % 3 == 0:
            target = f"edge{i}.cdn.example.net"
            records.append(wire.Record(owner, 5, 300, target))
            cnames.append(target)
            owner = target
        for j in range(1 + i % 4):
            if j % 2:
                records.append(wire.Record(owner, 28, 60, f"2001:db8::{i:x}:{j}"))
            else:
                records.append(wire.Record(owner, 1, 60, f"198.51.{i % 256}.{j}"))
        out.append((name, tuple(records), tuple(cnames)))
    return out


def _endpoints() -> list[Endpoint]:
    return [Endpoint(id=100 + i, namespace="shop", name=f"frontend-{i}",
                     labels={"app": "frontend", "k8s:tier": "web"}, ips=(f"10.0.0.{i}",))
            for i in range(8)]


def _record_kwargs(rng: random.Random, names: list[Answer], endpoints: list[Endpoint],
                   now: float) -> dict[str, Any]:
    """One record's fields, as ``proxy._record`` passes them."""
    name, answers, cnames = names[min(int(rng.paretovariate(1.2)) - 1, len(names) - 1)]
    endpoint = endpoints[rng.randrange(len(endpoints))]
    refused = rng.random() < 0.05
    allowed = () if refused else tuple(
        AllowedIp(r.data, now + r.ttl, "tcp/443") for r in answers if r.rtype != 5)
    return {
        "time": now, "type": "query" if refused else "answer", "protocol": "udp",
        "source": (endpoint.ips[0], rng.randrange(1024, 65536)),
        "server": None if refused else ("10.96.0.10", 53),
        "query_name": name, "query_type": "A", "query_class": 1,
        "query_id": rng.randrange(65536), "verdict": "denied" if refused else "allowed",
        "reason": "no-rule" if refused else "shop/allow-cdn",
        "rcode": "REFUSED" if refused else "NOERROR", "latency": rng.uniform(0.0002, 0.002),
        "answers": () if refused else answers, "cnames": () if refused else cnames,
        "allowed_ips": allowed, "endpoint": endpoint.identity,
        "query_message": b"q" * 40, "response_message": b"r" * 120,
    }


def _chunk(rng: random.Random, names: list[Answer],
           endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    now = time.time()
    return [_record_kwargs(rng, names, endpoints, now + i * 1e-5) for i in range(CHUNK)]


def _construct(kwargs: list[dict[str, Any]], fast: bool) -> tuple[list[Any], float]:
    """The records and the CPU seconds their construction took."""
    make = audit.AuditRecord.fast if fast else None  # type: ignore[attr-defined]
    start = time.process_time()
    if make is None:
        records = [audit.AuditRecord(**k) for k in kwargs]
    else:
        records = [make(**k) for k in kwargs]
    return records, time.process_time() - start


def run(total: int, seed: int) -> dict[str, float]:
    """µs per emit and per construction over ``total`` records."""
    rng = random.Random(seed)
    names, endpoints = _names(400), _endpoints()
    log = audit.JsonLinesAuditLog("/dev/null", total + 1, Metrics())
    fast = hasattr(audit.AuditRecord, "fast")
    emit_s = build_s = fast_s = 0.0
    try:
        for _ in range(total // CHUNK):
            kwargs = _chunk(rng, names, endpoints)
            records, build = _construct(kwargs, fast=False)
            build_s += build
            if fast:
                records, build = _construct(kwargs, fast=True)
                fast_s += build
            emit = log.emit
            start = time.process_time()
            for record in records:
                emit(record)
            emit_s += time.process_time() - start
    finally:
        log.close()
    result = {"emit_us": emit_s / total * 1e6, "construct_us": build_s / total * 1e6}
    if fast:
        result["fast_construct_us"] = fast_s / total * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = [run(args.records, seed) for seed in range(args.repeat)]
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        print(f"{key:18} median {statistics.median(values):6.3f} µs   "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
