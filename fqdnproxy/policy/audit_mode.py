"""Audit mode: try a policy on live traffic; what it would refuse is logged and let through.

Globally (``policy.audit_mode: true``) or per endpoint, with the inventory label
``fqdnproxy.io/audit: "true"``. For an endpoint in audit mode:

- the proxy's decide stage turns a refusal into verdict ``audit``: the query is forwarded and
  answered, and its audit record carries ``"verdict": "audit"`` and the reason it would have
  been refused (``AuditModeDecider``);
- the datapath gets the AUDIT endpoint flag: a packet it would drop is counted as ``AUDITED``,
  reported as a ``drop`` record with ``"verdict": "audit"``, and passed.

An unknown source (no endpoint) is let through only in global audit mode: without an endpoint
there is no label to read.
"""

from __future__ import annotations

from collections.abc import Callable

from fqdnproxy.dns import wire
from fqdnproxy.endpoints import Endpoint
from fqdnproxy.exchange import Client, Decider, Decision, Server

LABEL = "fqdnproxy.io/audit"


def audited(endpoint: Endpoint | None, globally: bool) -> bool:
    """Whether refusals for ``endpoint`` are only logged."""
    if globally:
        return True
    return endpoint is not None and endpoint.labels.get(LABEL, "").lower() == "true"


class AuditModeDecider:
    """A ``Decider`` that lets through what ``inner`` refuses for endpoints in audit mode."""

    def __init__(self, inner: Decider, is_audited: Callable[[Endpoint | None], bool]) -> None:
        self._inner = inner
        self._is_audited = is_audited

    def decide(self, client: Client, query: wire.Query, server: Server) -> Decision:
        decision = self._inner.decide(client, query, server)
        if decision.allowed or not self._is_audited(decision.endpoint):
            return decision
        return Decision(True, f"audit mode, would be {decision.outcome}: {decision.reason}",
                        verdict="audit", endpoint=decision.endpoint, policy=decision.policy)
