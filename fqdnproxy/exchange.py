"""The records and interfaces the query path is built from (pure: no sockets, no kernel).

``proxy.py`` runs the stages; the stages it calls are defined by the small protocols here, on the
consumer's side, so the policy engine and the allow-map learner plug in without the proxy knowing
them, and loopback tests plug in an in-memory allow map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fqdnproxy.dns import wire
from fqdnproxy.errors import FqdnproxyError

if TYPE_CHECKING:
    from fqdnproxy.endpoints import Endpoint

Server = tuple[str, int]

ReplyCallback = Callable[[bytes | None], None]
"""Settles one exchange for a listener: the reply to send, or None to stay silent."""


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent a query, and to which address: the proxy's own, or in transparent mode the
    original destination (the server the pod asked)."""

    ip: str
    port: int
    protocol: str  # "udp" or "tcp"
    local: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Decision:
    """What the decide stage concluded, and which rule said so.

    ``verdict`` names the outcome in metrics and audit records; ``rcode`` overrides the proxy's
    refusal code (SERVFAIL for an unknown source); ``endpoint`` and ``policy`` travel on to the
    learn stage so it does not look them up again.
    """

    allowed: bool
    reason: str
    verdict: str = ""  # "" means "allowed" or "denied" from ``allowed``
    rcode: wire.Rcode | None = None
    endpoint: Endpoint | None = None
    policy: Any = None  # policy.engine.EndpointPolicy of the endpoint

    @property
    def outcome(self) -> str:
        return self.verdict or ("allowed" if self.allowed else "denied")


@dataclass(frozen=True, slots=True)
class Exchange:
    """One query on its way through the stages."""

    client: Client
    data: bytes
    query: wire.Query
    received: float  # time.monotonic() at receipt
    server: Server | None = None
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class AllowedIp:
    """An IP an answer allowed the endpoint to reach: until when (wall clock) and on which ports."""

    ip: str
    expires: float  # seconds since the epoch
    ports: str  # as written to the datapath, e.g. "tcp/443"


class Decider(Protocol):
    """The decide stage: may this client ask this question of this server?"""

    def decide(self, client: Client, query: wire.Query, server: Server) -> Decision: ...


class Learner(Protocol):
    """The learn stage: record what an allowed answer teaches before it is released.

    Synchronous on purpose: the answer is released only after ``learn`` returns, so no pod can
    connect before its entries are in the map. Raises ``LearnError`` when the answer must not be
    released.
    """

    def learn(self, exchange: Exchange, response: wire.Response) -> tuple[AllowedIp, ...]: ...


class LearnError(FqdnproxyError):
    """The learn stage could not record what the answer teaches (for example, map full)."""


class AllowAll:
    """The decide stage without policies (no endpoint inventory configured): forward everything."""

    _ALLOWED = Decision(True, "no policy loaded")

    def decide(self, client: Client, query: wire.Query, server: Server) -> Decision:
        return self._ALLOWED


class NoLearning:
    """The learn stage without a datapath: answers teach nothing."""

    def learn(self, exchange: Exchange, response: wire.Response) -> tuple[AllowedIp, ...]:
        return ()
