"""FQDN cache at scale: learning rate, longest garbage-collection and snapshot pauses, memory.

    .venv/bin/python benchmarks/bench_cache.py [--entries 1000000] [--batch 2000]

Fills an ``FqdnCache`` with ENTRIES (endpoint, name, IP) entries the way answers do (1,000
endpoints, names of 10 IPs each), then measures what the agent's event loop would feel:
- learn: entries per second through ``FqdnCache.learn_keys``, each IP's text turned into its key
  (``fqdn.ipkey``) on the way, as ``AllowLearner.learn`` does (the cache part of the learn stage);
- gc: the longest single ``AllowLearner.collect_garbage`` step of ``--batch`` entries while
  every entry expires (the in-memory allow map stands in for the kernel map's writes);
- snapshot: the longest single ``snapshot_chunks`` step (what the loop does between yields);
- RSS of the process with the cache full (from /proc/self/status);
- one full collection of Python's cyclic garbage collector with the cache full: a pause the
  agent's own steps cannot split. The step figures above are measured with it disabled, so
  that each figure is the cost of one thing.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

from fqdnproxy.datapath.allowmap import NullAllowMap
from fqdnproxy import ipkey
from fqdnproxy.fqdn.cache import CacheLimits, FqdnCache
from fqdnproxy.fqdn.learner import AllowLearner

S = 1_000_000_000


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    base_rss = rss_mb()
    cache = FqdnCache(CacheLimits(max_entries=args.entries))
    names = args.entries // 10
    started = time.perf_counter()
    for n in range(names):
        endpoint = n % 1_000
        addresses = [(ipkey.key(f"10.{(n >> 8) & 255}.{n & 255}.{i}"), (1 + n % 600) * S)
                     for i in range(10)]
        cache.learn_keys(endpoint, f"name{n}.example.", addresses)
    learn_s = time.perf_counter() - started
    full_rss = rss_mb()
    t = time.perf_counter()
    gc.collect()
    python_gc = time.perf_counter() - t
    gc.disable()

    longest_chunk = 0.0
    chunks = cache.snapshot_chunks(5_000)
    while True:
        t = time.perf_counter()
        chunk = next(chunks, None)
        longest_chunk = max(longest_chunk, time.perf_counter() - t)
        if chunk is None:
            break

    learner = AllowLearner(cache, NullAllowMap(), lambda endpoint_id: None)
    step_times = []
    while len(cache):
        t = time.perf_counter()
        removed = learner.collect_garbage(10_000 * S, args.batch)
        step_times.append(time.perf_counter() - t)
        if not removed:
            break
    step_times.sort()
    longest_gc, steps = step_times[-1], len(step_times)
    median_gc = step_times[len(step_times) // 2]
    print(f"entries: {args.entries:,} ({names:,} names on 1,000 endpoints)")
    print(f"learn: {args.entries / learn_s:,.0f} entries/s ({learn_s:.1f} s)")
    print(f"RSS with the cache full: {full_rss:.0f} MB (cache about {full_rss - base_rss:.0f} MB)")
    print(f"one full Python GC collection: {python_gc * 1000:.1f} ms "
          f"({len(gc.get_objects()):,} tracked objects)")
    print(f"longest snapshot step (5,000 entries): {longest_chunk * 1000:.1f} ms")
    print(f"longest GC step ({args.batch:,} entries, map deletes included): "
          f"{longest_gc * 1000:.1f} ms over {steps} steps (median {median_gc * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
