"""The learn stage alone, into the kernel's allow map: what one new 20-IP answer costs the agent.

    sudo .venv/bin/python -m benchmarks.bench_learn --pin-dir /sys/fs/bpf/fqpbench-learn \
        [--answers 20000]

The end-to-end figure (learn_memory.py) includes the sockets, the query path and whatever else
the machine is doing; this one is the part the learn stage owns, in one process, measured in CPU
time: for ANSWERS distinct answers of IPS_PER_NAME distinct IPv4 addresses each (the shape of
learn_memory.py's zone), with the DNS comparison's policy and an allow map compiled for them,

- parse: ``wire.parse_response`` of the answer;
- learn: ``AllowLearner.learn`` (cache, entries, the kernel write), as the agent runs it
  without an audit log;
- of which the kernel write: the ``bpf(BPF_MAP_UPDATE_BATCH)`` calls alone.

Each figure is the median over chunks of 500 answers, in microseconds per answer, so a pause
of the machine moves one chunk rather than the figure. Objects made before the timed loop are
frozen out of the garbage collector's walks, as the agent freezes its startup objects. Needs
root (BPF) and bcc.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import struct
import tempfile
import time
from pathlib import Path

from benchmarks import dns_compare
from benchmarks.learn_memory import IPS_PER_NAME, TTL, map_census
from fqdnproxy.datapath import bpfsys, egress
from fqdnproxy.dns import wire
from fqdnproxy.exchange import Client, Decision, Exchange
from fqdnproxy.fqdn.cache import CacheLimits, FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner, LearnSettings
from fqdnproxy.observe import gc_pauses
from fqdnproxy.policy.reload import PolicyStore

CHUNK = 500


def answers(count: int) -> list[tuple[bytes, bytes]]:
    """(query, answer) wire messages: n<i>.learn.test A, IPS_PER_NAME distinct addresses each,
    every owner a pointer to the question name, as knot writes them."""
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    out = []
    for n in range(count):
        qname = b"".join(bytes([len(label)]) + label
                         for label in (f"n{n}".encode(), b"learn", b"test")) + b"\x00"
        question = qname + struct.pack("!HH", 1, 1)
        query = struct.pack("!HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0) + question
        records = b"".join(
            struct.pack("!HHHIHI", 0xC00C, 1, 1, TTL, 4, base + n * IPS_PER_NAME + i)
            for i in range(IPS_PER_NAME))
        answer = (struct.pack("!HHHHHH", n & 0xFFFF, 0x8580, 1, IPS_PER_NAME, 0, 0) + question
                  + records)
        out.append((query, answer))
    return out


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pin-dir", required=True, help="a fresh directory on a bpffs")
    parser.add_argument("--answers", type=int, default=20_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fqpbench-learn-"))
    try:
        inputs = dns_compare.write_inputs(workdir)
        store = PolicyStore(inputs["policy"], inputs["inventory"])
        store.load()
        snapshot = store.current
        endpoint = snapshot.registry.by_ip(dns_compare.CLIENT_IP)
        assert endpoint is not None, "the policy's inventory lists the client address"
        policy = snapshot.engine.for_endpoint(endpoint)
        pin_dir = Path(args.pin_dir)
        datapath = egress.EgressDatapath.load(
            pin_dir, egress.Options(allow_max=args.answers * IPS_PER_NAME + 1024))
        try:
            run(args.answers, endpoint, policy, datapath, pin_dir)
        finally:
            datapath.close()
            for pin in pin_dir.iterdir():  # the maps go with their pins (nothing attached)
                pin.unlink()
            pin_dir.rmdir()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(count: int, endpoint: object, policy: object, datapath: egress.EgressDatapath,
        pin_dir: Path) -> None:
    limits = CacheLimits(max_names_per_endpoint=count * 2, max_entries=count * IPS_PER_NAME * 2)
    learner = AllowLearner(FqdnCache(limits), datapath, lambda endpoint_id: policy,
                           LearnSettings(report_allowed=False))
    client = Client(dns_compare.CLIENT_IP, 4000, "udp", (dns_compare.PROXY_IP, 53))
    decision = Decision(True, "allowed", endpoint=endpoint, policy=policy)
    messages = answers(count)
    write_ns = [0]
    update_batch = bpfsys.update_batch

    def timed_update_batch(*a: object) -> None:  # the kernel write, timed apart
        started = time.thread_time_ns()
        try:
            update_batch(*a)  # type: ignore[arg-type]
        finally:
            write_ns[0] += time.thread_time_ns() - started

    bpfsys.update_batch = timed_update_batch  # type: ignore[assignment]
    # As the agent does once started: what setup made (bcc's and LLVM's objects, the messages)
    # is left out of later collections, which otherwise walk it over and over.
    gc_pauses.freeze_startup_objects()
    parse_us, learn_us, write_us = [], [], []
    try:
        for start in range(0, count, CHUNK):
            chunk = messages[start:start + CHUNK]
            exchanges = [Exchange(client, query, wire.parse_query(query), 0.0,
                                  (dns_compare.PROXY_IP, 53), decision) for query, _ in chunk]
            t0 = time.thread_time_ns()
            responses = [wire.parse_response(answer) for _, answer in chunk]
            t1 = time.thread_time_ns()
            write_ns[0] = 0
            for exchange, response in zip(exchanges, responses):
                learner.learn(exchange, response)
            t2 = time.thread_time_ns()
            parse_us.append((t1 - t0) / len(chunk) / 1000)
            learn_us.append((t2 - t1) / len(chunk) / 1000)
            write_us.append(write_ns[0] / len(chunk) / 1000)
    finally:
        bpfsys.update_batch = update_batch
    entries = sum(m.get("entries", 0) for m in map_census(pin_dir) if m["map"] == "allow_exact")
    total = median(parse_us) + median(learn_us)
    print(f"answers: {count:,} of {IPS_PER_NAME} IPv4 addresses; allow map entries after: "
          f"{entries:,}")
    print(f"parse: {median(parse_us):.1f} us per answer")
    print(f"learn: {median(learn_us):.1f} us per answer, of which the kernel write "
          f"{median(write_us):.1f} us")
    print(f"parse and learn: {total:.1f} us per answer = "
          f"{IPS_PER_NAME / total * 1e6:,.0f} entries per CPU second")


if __name__ == "__main__":
    main()
