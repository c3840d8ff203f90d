"""The decide stage backed by the policy engine: which endpoint asks, and may it?

The source IP names the endpoint (the inventory); its compiled ``EndpointPolicy`` judges the
question against the server the client asked. An unknown source is answered SERVFAIL: fqdnproxy
cannot tell whose rules apply, and guessing would either leak or break a workload.

A verdict depends only on the snapshot and on (source IP, server, protocol, name), so verdicts
are remembered per snapshot (``memo``, capped, FIFO): pods ask the same names again and again,
and a repeat costs one dict lookup instead of the endpoint lookup and the name matchers. A new
snapshot (any policy or inventory reload) forgets every remembered verdict before it decides.
"""

from __future__ import annotations

from typing import Callable

from fqdnproxy.dns import wire
from fqdnproxy.exchange import Client, Decision, Server
from fqdnproxy.memo import BoundedMemo
from fqdnproxy.policy import engine as engine_mod
from fqdnproxy.policy.reload import Snapshot

DEFAULT_MEMO_SIZE = 16_384  # verdicts: (source, server, protocol, name) combinations

_MemoKey = tuple[str, Server, str, str]


class PolicyDecider:
    """``Decider`` over the current policy snapshot (swapped atomically on reload)."""

    def __init__(self, current: Callable[[], Snapshot], memo_size: int = DEFAULT_MEMO_SIZE) -> None:
        self._current = current
        self.memo: BoundedMemo[_MemoKey, Decision] = BoundedMemo(memo_size)
        self._memo_snapshot: Snapshot | None = None  # the snapshot the memo's verdicts are from

    def decide(self, client: Client, query: wire.Query, server: Server) -> Decision:
        snapshot = self._current()
        if snapshot is not self._memo_snapshot:
            self.memo.clear()
            self._memo_snapshot = snapshot
        key = (client.ip, server, client.protocol, query.question.name)
        decision = self.memo.get(key)
        if decision is None:
            decision = self._decide(snapshot, client, query, server)
            self.memo.put(key, decision)
        return decision

    def _decide(self, snapshot: Snapshot, client: Client, query: wire.Query,
                server: Server) -> Decision:
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
