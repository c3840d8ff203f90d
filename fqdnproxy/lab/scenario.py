"""The demo's script, run against a lab that is up, over IPv4 or IPv6; asserted by tests/lab/.

    1  frontend looks up api.demo.test           allowed by rules.dns          -> its address
    2  frontend connects to it on TCP 443         learned before the answer     -> connected
    3  frontend looks up blocked.demo.test        egressDeny toFQDNs            -> REFUSED
    4  backend looks up api.demo.test             no rule allows                -> REFUSED
    5  frontend connects to an address no name    nothing learned               -> dropped
       returned (UNRESOLVED, a live server)
    6  frontend looks up short.demo.test (TTL 2)  allowed                       -> its address
    7  frontend connects to it, keeps it open     learned                       -> connected
    8  ... the TTL passes; a new connection       the entry expired (kernel)    -> dropped
    9  ... the connection from 7 exchanges data   established flows survive     -> works
   10  backend looks up db.demo.test              allowed                       -> its address
   11  backend connects to it on TCP 443          learned for backend           -> connected
   12  frontend connects to that address          learned for backend only (its -> dropped
                                                  policy would allow the name)

Expected answers are the demo zone's records (fqdnproxy/lab/zones/demo.test.zone). Lookups go to
kube-dns's address, as a pod's resolver would; the node hands them to the proxy (transparent
mode, or explicit mode with the node holding that address).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fqdnproxy.lab import client, topology
from fqdnproxy.lab.lab import Lab

PORT = 443  # demo.yaml opens TCP 80 and 443 to learned addresses

# The demo zone's answers, by family.
ADDRESSES = {
    4: {"api": "203.0.113.10", "db": "203.0.113.11", "short": "203.0.113.20"},
    6: {"api": "2001:db8::10", "db": "2001:db8::11", "short": "2001:db8::21"},
}
QTYPE = {4: "A", 6: "AAAA"}
SHORT_TTL = 2  # short.demo.test's TTL; the lab runs the agent with cache.min_ttl 2


@dataclass(frozen=True)
class Result:
    """One step: what was done, what was expected, what happened."""

    number: int
    family: int
    pod: str
    action: str  # "dig api.demo.test AAAA" or "tcp [2001:db8::10]:443"
    expected: str
    actual: str
    source_ip: str  # the pod's address used (audit records carry it)
    query: tuple[str, str] | None = None  # (name with trailing dot, qtype) for lookups
    destination: tuple[str, int] | None = None  # for connections
    source_port: int = 0  # for connections
    drops: str = ""  # the datapath's drop counters that grew for the pod: "no_entry", ...

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


def run(lab: Lab, family: int, say: Callable[[str], None] = lambda _text: None) -> list[Result]:
    """Play the scenario from the lab's pods over IPv``family``; one Result per step."""
    frontend, backend = lab.plan.pod("frontend"), lab.plan.pod("backend")
    server = lab.plan.dns_server(family)
    addresses = ADDRESSES[family]
    qtype = QTYPE[family]
    unresolved = next(ip for ip in topology.UNRESOLVED if (":" in ip) == (family == 6))
    results: list[Result] = []

    def lookup(pod: topology.Pod, name: str, expected: str) -> client.Lookup:
        answer = client.dig(pod.namespace, name, qtype, server=server)
        data = answer.data(qtype)
        actual = f"{answer.status} {', '.join(data)}".strip()
        results.append(Result(len(results) + 1, family, pod.name, f"dig {name} {qtype}",
                              expected, actual, pod.ip(family), query=(name + ".", qtype)))
        return answer

    def connect(pod: topology.Pod, ip: str, expected: str,
                session: client.Session | None = None, action: str = "") -> None:
        before = _drop_counters(lab, pod.endpoint_id)
        if session is not None:
            ok, port = session.exchange(), session.port
        else:
            ok, port = client.connect(pod.namespace, ip, PORT)
        after = _drop_counters(lab, pod.endpoint_id)
        grew = ", ".join(reason for reason, count in after.items() if count > before.get(reason, 0))
        results.append(Result(len(results) + 1, family, pod.name,
                               action or f"tcp {_endpoint(ip, PORT)}", expected,
                               "connected" if ok else "dropped", pod.ip(family),
                               destination=(ip, PORT), source_port=port, drops=grew))

    lookup(frontend, "api.demo.test", f"NOERROR {addresses['api']}")
    connect(frontend, addresses["api"], "connected")
    lookup(frontend, "blocked.demo.test", "REFUSED")
    lookup(backend, "api.demo.test", "REFUSED")
    connect(frontend, unresolved, "dropped")
    answer = lookup(frontend, "short.demo.test", f"NOERROR {addresses['short']}")
    looked_up = time.monotonic()
    ttl = max(answer.ttl(qtype) or 0, SHORT_TTL)
    with client.Session.open(frontend.namespace, addresses["short"], PORT) as held:
        connect(frontend, addresses["short"], "connected", session=held,
                action=f"tcp {_endpoint(addresses['short'], PORT)}, kept open")
        wait = max(0.0, looked_up + ttl + 1.0 - time.monotonic())  # until past the expiry
        say(f"  waiting {wait:.1f} s for short.demo.test's {ttl} s TTL to pass ...")
        time.sleep(wait)
        connect(frontend, addresses["short"], "dropped",
                action=f"tcp {_endpoint(addresses['short'], PORT)}, new, after {ttl} s TTL")
        connect(frontend, addresses["short"], "connected", session=held,
                action="the kept connection, after the TTL")
    lookup(backend, "db.demo.test", f"NOERROR {addresses['db']}")
    connect(backend, addresses["db"], "connected")
    connect(frontend, addresses["db"], "dropped",
            action=f"tcp {_endpoint(addresses['db'], PORT)} (backend's answer)")
    return results


def records_for(result: Result, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The audit records of ``result``'s step: its query's, or its connection's drops."""
    found = []
    for record in records:
        source = (record.get("source") or {}).get("ip")
        if source != result.source_ip:
            continue
        if result.query is not None and record.get("type") in ("answer", "query"):
            if (record["query"]["name"], record["query"]["type"]) == result.query:
                found.append(record)
        elif result.destination is not None and record.get("type") == "drop":
            destination = record.get("destination") or {}
            if ((destination.get("ip"), destination.get("port")) == result.destination
                    and record["source"].get("port") == result.source_port):
                found.append(record)
    return found


def _drop_counters(lab: Lab, endpoint_id: int) -> dict[str, int]:
    """The datapath's drop counters of one endpoint, by reason ({} if they cannot be read)."""
    from fqdnproxy.datapath import pinned

    try:
        with pinned.PinnedMaps.open(lab.pin_dir) as maps:
            counts = maps.counters().get(endpoint_id, {})
    except Exception:  # the counters are commentary; the step's outcome is what is asserted
        return {}
    return {reason.name.lower().removeprefix("drop_"): count for reason, count in counts.items()
            if reason.name.startswith("DROP_")}


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

