"""The decide stage backed by the policy engine: which endpoint asks, and may it?

The source IP names the endpoint (the inventory); its compiled ``EndpointPolicy`` judges the
question against the server the client asked. An unknown source is answered SERVFAIL: fqdnproxy
cannot tell whose rules apply, and guessing would either leak or break a workload.
"""

from __future__ import annotations

from typing import Callable

from fqdnproxy.dns import wire
from fqdnproxy.exchange import Client, Decision, Server
from fqdnproxy.policy import engine as engine_mod
from fqdnproxy.policy.reload import Snapshot


class PolicyDecider:
    """``Decider`` over the current policy snapshot (swapped atomically on reload)."""

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def decide(self, client: Client, query: wire.Query, server: Server) -> Decision:
        snapshot = self._current()
        endpoint = snapshot.registry.by_ip(client.ip)
        if endpoint is None:
            return Decision(False, f"no endpoint has source address {client.ip}",
                            verdict="no-endpoint", rcode=wire.Rcode.SERVFAIL)
        policy = snapshot.engine.for_endpoint(endpoint)
        verdict = policy.decide(server[0], server[1], client.protocol.upper(),
                                query.question.name)
        return Decision(verdict.allowed, describe(verdict), endpoint=endpoint, policy=policy)


def describe(verdict: engine_mod.Decision) -> str:
    """The reason an audit record gives: the engine's words and the rule's location."""
    if verdict.rule is None:
        return verdict.reason
    return f"{verdict.reason}: {verdict.rule}"
