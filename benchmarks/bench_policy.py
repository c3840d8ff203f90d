"""Policy engine: compile time and per-decision cost at 10, 1,000 and 10,000 selectors.

Run from the repository root::

    .venv/bin/python benchmarks/bench_policy.py            # table
    .venv/bin/python benchmarks/bench_policy.py --json     # one JSON object per size

One endpoint is selected by one policy whose toFQDNs and rules.dns each hold N selectors, a mix of
matchName, ``*.x`` patterns, ``**.x`` patterns and mid-label globs (``api7-*``). Reported:
load (YAML -> model, libyaml), compile (PolicyEngine: every selector into one matcher, including the
DNS views of the inventory's DNS services), "dns view" (any compiling left for the first query to
kube-dns; 0 since the engine warms it), and the mean cost of ``decide`` (allowed exact name,
allowed ``**.`` name, refused name) and ``select``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fqdnproxy import endpoints  # noqa: E402
from fqdnproxy.policy import engine, load  # noqa: E402

INVENTORY = """endpoints:
- {namespace: bench, name: client, id: 1, labels: {app: client}, ips: [198.51.100.1]}
- {namespace: kube-system, name: kube-dns, kind: service, labels: {k8s-app: kube-dns}, ips: [198.51.100.53]}
"""


def selectors(count: int) -> list[str]:
    kinds = (
        lambda i: f"matchName: host{i}.example.com",
        lambda i: f'matchPattern: "*.svc{i}.example.com"',
        lambda i: f'matchPattern: "**.zone{i}.example"',
        lambda i: f'matchPattern: "api{i}-*.example.org"',
    )
    return [kinds[i % 4](i) for i in range(count)]


def policy_text(count: int) -> str:
    items = "\n".join(f"      - {s}" for s in selectors(count))
    dns = "\n".join(f"          - {s}" for s in selectors(count))
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench, namespace: bench}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toEndpoints:
    - matchLabels: {{"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns:
{dns}
  - toFQDNs:
{items}
    toPorts:
    - ports: [{{port: "443", protocol: TCP}}]
"""


def per_call_ns(function, *args, rounds: int = 50_000) -> float:  # type: ignore[no-untyped-def]
    function(*args)  # warm the per-server view
    started = time.perf_counter_ns()
    for _ in range(rounds):
        function(*args)
    return (time.perf_counter_ns() - started) / rounds


def measure(count: int) -> dict[str, float | int]:
    text = policy_text(count)
    started = time.perf_counter()
    policy_set = load.parse_text("bench.yaml", text).policy_set()
    loaded = time.perf_counter()
    registry = endpoints.parse_inventory("inventory.yaml", INVENTORY)
    compiled = engine.PolicyEngine(policy_set, registry).for_id(1)
    assert compiled is not None
    server = "198.51.100.53"
    view_started = time.perf_counter()
    compiled.decide(server, 53, "UDP", "warm.up.")  # builds the per-server DNS matcher once
    view = time.perf_counter() - view_started
    compiled_at = time.perf_counter()
    exact = f"host{(count - 4) // 4 * 4}.example.com."
    deep = f"a.b.zone{2 if count > 2 else 0}.example."
    assert compiled.decide(server, 53, "UDP", exact).allowed
    assert compiled.decide(server, 53, "UDP", deep).allowed or count < 3
    assert not compiled.decide(server, 53, "UDP", "not.allowed.example.").allowed
    return {
        "selectors": count,
        "load_ms": (loaded - started) * 1e3,
        "compile_ms": (compiled_at - loaded - view) * 1e3,
        "dns_view_ms": view * 1e3,
        "decide_exact_ns": per_call_ns(compiled.decide, server, 53, "UDP", exact),
        "decide_deep_ns": per_call_ns(compiled.decide, server, 53, "UDP", deep),
        "decide_refused_ns": per_call_ns(compiled.decide, server, 53, "UDP", "not.allowed.example."),
        "select_ns": per_call_ns(compiled.select, exact),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1_000, 10_000])
    args = parser.parse_args()
    rows = [measure(size) for size in args.sizes]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'selectors':>9}  {'load':>9}  {'compile':>9}  {'dns view':>9}  {'decide exact':>12}  "
          f"{'decide **.':>10}  {'refused':>9}  {'select':>9}")
    for row in rows:
        print(f"{row['selectors']:>9}  {row['load_ms']:>7.1f}ms  {row['compile_ms']:>7.1f}ms  "
              f"{row['dns_view_ms']:>7.1f}ms  {row['decide_exact_ns'] / 1e3:>10.2f}µs  "
              f"{row['decide_deep_ns'] / 1e3:>8.2f}µs  {row['decide_refused_ns'] / 1e3:>7.2f}µs  "
              f"{row['select_ns'] / 1e3:>7.2f}µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
