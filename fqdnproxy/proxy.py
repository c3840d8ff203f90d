"""The path of one query: read, decide, forward, learn, release.

    bytes in ─► read ─► admit ─► decide ─► forward ─► learn ─► release ─► bytes out
                 │        │         │          │          │
              FORMERR  SERVFAIL  REFUSED   SERVFAIL    SERVFAIL
              or drop  (overload)          or silence  (map write failed)

The stages, in order (CoreDNS keeps this list in ``plugin.cfg``; we keep it here):

1. read:    the wire fast path reads the header and the question (a repeat of a message
            seen before, ID aside, comes from ``ParseCache``); unreadable -> FORMERR if
            the header could be read, else dropped. Both counted. Opcodes other than QUERY
            (NOTIFY, UPDATE, ...) get NOTIMP.
2. admit:   the in-flight cap; past it SERVFAIL, counted.
3. decide:  the ``Decider`` (policy engine; ``AllowAll`` until policies are wired in). In
            audit mode a refusal becomes verdict ``audit`` and the query goes on.
4. forward: the ``UpstreamClient`` over the client's protocol, to the server the ``Router``
            names (a configured upstream, or in transparent mode the original destination).
            Timeout: no answer, the client retries. Unreachable or bad answer: SERVFAIL.
5. learn:   the ``Learner`` sees the parsed answer before release (the allow-map writer;
            ``NoLearning`` until the datapath is wired in). A failure means SERVFAIL: never
            release an answer whose connection the datapath would drop.
6. release: the client's ID restored; one audit record; metrics.

Stages 1-3 run in ``_start`` and 5-6 in ``_settle``, both synchronous; only the forward waits.
A UDP query (``receive``) waits in a callback from the upstream socket, so the whole path
costs no task, future or coroutine: measured under dnsperf, a task and a future per query were
a third of the agent's CPU beyond the stages themselves. TCP (``handle``) awaits the forward.

Every failure goes through ``_fail``; nothing raised inside a stage escapes ``receive`` or
``handle``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from fqdnproxy import ratelimit
from fqdnproxy.dns import parse_cache
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.dns import wire
from fqdnproxy.exchange import (
    AllowAll, AllowedIp, Client, Decider, Exchange, Learner, LearnError, NoLearning,
    ReplyCallback, Server)
from fqdnproxy.observe import metrics as metrics_mod
from fqdnproxy.observe.audit import AuditRecord, AuditSink, NullAuditSink
from fqdnproxy.observe.metrics import Metrics

log = logging.getLogger(__name__)


class Router(Protocol):
    """Where a client's query goes upstream."""

    def server_for(self, client: Client) -> Server: ...


class RoundRobinUpstreams:
    """Explicit mode: queries go to the configured upstreams in turn."""

    def __init__(self, servers: list[Server]) -> None:
        if not servers:
            raise ValueError("at least one upstream server is needed")
        self._cycle = itertools.cycle(servers)

    def server_for(self, client: Client) -> Server:
        return next(self._cycle)


class OriginalDestination:
    """Transparent mode: a redirected query goes to the server the client asked; a query sent to
    one of the proxy's own listeners (explicit mode) goes to the configured upstreams."""

    def __init__(self, own_addresses: set[tuple[str, int]], upstreams: Router) -> None:
        self._own = own_addresses
        self._upstreams = upstreams

    def server_for(self, client: Client) -> Server:
        if client.local in self._own:
            return self._upstreams.server_for(client)
        return client.local


@dataclass(frozen=True, slots=True)
class ProxySettings:
    max_in_flight: int = 10_000
    deny_rcode: wire.Rcode = wire.Rcode.REFUSED
    rate_limit: ratelimit.RateLimit | None = None  # None: no per-client limit
    parse_cache_size: int = parse_cache.DEFAULT_CAPACITY  # messages per kind; 0: parse every time


class Proxy:
    """The query handler the listeners call.

    Two entries into the same stages: ``receive(data, client, done)`` for UDP listeners, which
    settles through a callback and so costs no task, future or coroutine per query (the
    forward stage continues from the upstream socket's callback); and ``await handle(data,
    client)`` for TCP connections and tests.
    """

    def __init__(self, upstream: upstream_mod.UpstreamClient, router: Router, audit: AuditSink,
                 metrics: Metrics, settings: ProxySettings = ProxySettings(),
                 decider: Decider | None = None, learner: Learner | None = None) -> None:
        self._upstream = upstream
        self._router = router
        self._audit = audit
        # No record is built for a sink that drops it (audit off): the learn benchmark's
        # answers carry 20 addresses, and their record was about 4% of the agent's CPU.
        self._auditing = not isinstance(audit, NullAuditSink)
        self._metrics = metrics
        self._settings = settings
        self._decider: Decider = decider or AllowAll()
        self._learner: Learner = learner or NoLearning()
        self._in_flight = 0
        self._buckets = (ratelimit.TokenBuckets(settings.rate_limit)
                         if settings.rate_limit is not None else None)
        if self._buckets is not None:
            metrics.watch_rate_limit(self._buckets)
        self._parsed = parse_cache.ParseCache(settings.parse_cache_size)
        metrics.watch_parse_cache(self._parsed)
        # Read at scrape time: no gauge update on every query.
        metrics.in_flight.set_function(lambda: self._in_flight)

    @property
    def in_flight(self) -> int:
        """Queries forwarded upstream and not yet settled."""
        return self._in_flight

    def receive(self, data: bytes, client: Client, done: ReplyCallback) -> None:
        """Handle one UDP query: ``done`` gets the reply (None: silence) exactly once, now or
        when the upstream settles the query. Never raises."""
        started = self._start_guarded(data, client)
        if not isinstance(started, Exchange):
            done(started)
            return
        assert started.server is not None
        forwarded = time.monotonic()
        answered = functools.partial(self._answered, started, done, forwarded)
        try:
            self._upstream.send_udp(started.server, started.query, started.data, answered)
        except Exception as error:  # not sent, so never settled there: settle it here
            answered(None, error)

    async def handle(self, data: bytes, client: Client) -> bytes | None:
        """The reply to send back, or None to stay silent. Never raises."""
        started = self._start_guarded(data, client)
        if not isinstance(started, Exchange):
            return started
        forwarded = time.monotonic()
        answer: bytes | None = None
        error: Exception | None = None
        try:
            answer = await self._forward(started)
        except Exception as failure:  # the upstream's errors, or the stage boundary's
            error = failure
        finally:
            self._in_flight -= 1
        return self._settle_guarded(started, forwarded, answer, error)

    def _answered(self, exchange: Exchange, done: ReplyCallback, forwarded: float,
                  answer: bytes | None, error: Exception | None) -> None:
        """The upstream settled a query that ``receive`` forwarded."""
        self._in_flight -= 1
        done(self._settle_guarded(exchange, forwarded, answer, error))

    # --- the stages, each side of the forward ---------------------------------------------

    def _start_guarded(self, data: bytes, client: Client) -> Exchange | bytes | None:
        try:
            return self._start(data, client)
        except Exception:  # even the failure path failed (an audit sink, say): count, log, drop
            self._boundary_failed()
            return None

    def _settle_guarded(self, exchange: Exchange, forwarded: float, answer: bytes | None,
                        error: Exception | None) -> bytes | None:
        try:
            try:
                return self._settle(exchange, forwarded, answer, error)
            except Exception as failure:  # the stage boundary: count, log, SERVFAIL
                return self._internal_error(exchange, failure)
        except Exception:
            self._boundary_failed()
            return None

    def _start(self, data: bytes, client: Client) -> Exchange | bytes | None:
        """Read, admit and decide: the exchange to forward (counted in flight), or the reply the
        proxy gives itself (None: silence)."""
        received = time.monotonic()
        query = self._read(data)
        if query is None:
            return self._malformed_reply(data)
        if self._buckets is not None and not self._buckets.allow(client.ip, received):
            return self._rate_limited(Exchange(client, data, query, received))
        if self._in_flight >= self._settings.max_in_flight:
            self._metrics.overload.inc()
            return self._fail(Exchange(client, data, query, received), wire.Rcode.SERVFAIL,
                              "overload", "in-flight cap reached")
        if query.header.opcode != 0:
            return self._fail(Exchange(client, data, query, received), wire.Rcode.NOTIMP,
                              "malformed", f"opcode {query.header.opcode} not supported")
        try:
            server = self._router.server_for(client)
            # Policy judges the server the client asked (in explicit mode the proxy's own
            # address, in transparent mode the original destination), not our upstream.
            decision = self._decider.decide(client, query, client.local)
        except Exception as error:
            return self._internal_error(Exchange(client, data, query, received), error)
        exchange = Exchange(client, data, query, received, server, decision)
        if not decision.allowed:
            rcode = decision.rcode if decision.rcode is not None else self._settings.deny_rcode
            return self._fail(exchange, rcode, decision.outcome, decision.reason)
        self._in_flight += 1
        return exchange

    def _settle(self, exchange: Exchange, forwarded: float, answer: bytes | None,
                error: Exception | None) -> bytes | None:
        """Learn from the upstream's answer and release it, or fail the exchange."""
        decision = exchange.decision
        assert decision is not None
        verdict = decision.outcome  # "allowed", or "audit": refused, but in audit mode
        if error is not None:
            return self._upstream_failed(exchange, verdict, error)
        assert answer is not None
        self._metrics.child(self._metrics.upstream_latency, exchange.client.protocol).observe(
            time.monotonic() - forwarded)
        try:
            response = self._parsed.response(answer)
        except wire.WireError as bad:
            self._metrics.upstream_errors.labels("bad_answer").inc()
            return self._fail(exchange, wire.Rcode.SERVFAIL, verdict,
                              f"upstream answer unreadable: {bad}")
        try:
            allowed_ips = self._learner.learn(exchange, response)
        except LearnError as not_learned:
            return self._fail(exchange, wire.Rcode.SERVFAIL, verdict, f"not learned: {not_learned}")
        return self._release(exchange, answer, response, allowed_ips)

    def _upstream_failed(self, exchange: Exchange, verdict: str,
                         error: Exception) -> bytes | None:
        if isinstance(error, upstream_mod.UpstreamTimeout):
            self._metrics.upstream_errors.labels("timeout").inc()
            return self._fail(exchange, None, verdict, "upstream timeout; no answer sent")
        if isinstance(error, upstream_mod.UpstreamError):
            self._metrics.upstream_errors.labels(error.reason).inc()
            return self._fail(exchange, wire.Rcode.SERVFAIL, verdict, f"upstream: {error}")
        raise error  # not the upstream's: the stage boundary answers it

    def _internal_error(self, exchange: Exchange, error: Exception) -> bytes | None:
        self._metrics.handler_errors.inc()
        log.error("handler failed for %s", exchange.query.question.name,
                  exc_info=(type(error), error, error.__traceback__))
        return self._fail(exchange, wire.Rcode.SERVFAIL, "error", f"internal error: {error}")

    def _boundary_failed(self) -> None:
        self._metrics.handler_errors.inc()
        log.exception("handler failed outside its own boundary")

    def _rate_limited(self, exchange: Exchange) -> bytes:
        """REFUSED for a client over its rate; one audit record per client and second."""
        self._count(exchange, "rate-limited", wire.Rcode.REFUSED)
        assert self._buckets is not None
        if self._buckets.report(exchange.client.ip, exchange.received):
            self._audit.emit(self._record(exchange, "query", "rate-limited",
                                          "over the per-client query rate (more refused this "
                                          "second are counted, not logged)",
                                          wire.Rcode.REFUSED, None, None))
        return wire.build_reply(exchange.query, exchange.data, wire.Rcode.REFUSED)

    async def _forward(self, exchange: Exchange) -> bytes:
        assert exchange.server is not None
        if exchange.client.protocol == "tcp":
            return await self._upstream.exchange_tcp(exchange.server, exchange.query,
                                                     exchange.data)
        return await self._upstream.exchange_udp(exchange.server, exchange.query, exchange.data)

    def _read(self, data: bytes) -> wire.Query | None:
        try:
            query = self._parsed.query(data)
        except wire.WireError:
            return None
        if query.header.qr:
            return None  # a response sent to us: never answer it (no reflection loops)
        return query

    def _malformed_reply(self, data: bytes) -> bytes | None:
        """FORMERR when the header can be read (and is a query), else drop. Counted either way."""
        try:
            header = wire.parse_header(data)
        except wire.WireError:
            self._metrics.malformed.labels("dropped").inc()
            return None
        if header.qr:
            self._metrics.malformed.labels("dropped").inc()
            return None
        self._metrics.malformed.labels("formerr").inc()
        return wire.formerr(header)

    def _release(self, exchange: Exchange, answer: bytes, response: wire.Response,
                 allowed_ips: tuple[AllowedIp, ...]) -> bytes:
        reply = wire.with_id(answer, exchange.query.header.id)
        rcode = response.header.rcode
        decision = exchange.decision
        verdict = decision.outcome if decision is not None else "allowed"
        self._count(exchange, verdict, rcode)
        if self._auditing:
            self._audit.emit(self._record(
                exchange, "answer", verdict, decision.reason if decision is not None else "",
                rcode, response, reply, allowed_ips))
        return reply

    def _fail(self, exchange: Exchange, rcode: wire.Rcode | None, verdict: str,
              reason: str) -> bytes | None:
        """The one exit for every exchange the proxy ends itself; ``rcode`` None is silence."""
        self._count(exchange, verdict, rcode)
        reply = wire.build_reply(exchange.query, exchange.data, rcode) if rcode is not None else None
        if self._auditing:
            self._audit.emit(self._record(exchange, "query", verdict, reason, rcode, None, reply))
        return reply

    def _count(self, exchange: Exchange, verdict: str, rcode: int | None) -> None:
        m = self._metrics
        protocol = exchange.client.protocol
        m.child(m.queries, verdict, metrics_mod.qtype_label(exchange.query.question.qtype),
                protocol).inc()
        if rcode is not None:
            m.child(m.answers, metrics_mod.rcode_label(rcode)).inc()
            m.child(m.total_latency, protocol).observe(time.monotonic() - exchange.received)

    def _record(self, exchange: Exchange, kind: str, verdict: str, reason: str,
                rcode: int | None, response: wire.Response | None,
                reply: bytes | None, allowed_ips: tuple[AllowedIp, ...] = ()) -> AuditRecord:
        question = exchange.query.question
        client = exchange.client
        return AuditRecord.fast(
            time=time.time(),
            type=kind,
            protocol=client.protocol,
            source=(client.ip, client.port),
            server=exchange.server,
            query_name=question.name,
            query_type=wire.qtype_name(question.qtype),
            query_class=question.qclass,
            query_id=exchange.query.header.id,
            verdict=verdict,
            reason=reason,
            rcode=metrics_mod.rcode_label(rcode) if rcode is not None else None,
            latency=time.monotonic() - exchange.received,
            answers=response.records if response is not None else (),
            cnames=response.cnames if response is not None else (),
            allowed_ips=allowed_ips,
            endpoint=_endpoint_identity(exchange),
            query_message=exchange.data,
            response_message=reply,
        )


def _endpoint_identity(exchange: Exchange) -> dict[str, object] | None:
    decision = exchange.decision
    if decision is None or decision.endpoint is None:
        return None
    return decision.endpoint.identity
