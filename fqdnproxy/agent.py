"""The composition root: builds the components, wires them, starts, reloads and stops them.

The path of one query through what is wired here (DESIGN.md, "The path of one query"):

    pod ──query──► DnsServer (dns/server.py: UDP/TCP listeners)
                      │ data, Client
                      ▼
                   Proxy.handle (proxy.py) ── read ─ admit ─ decide ─ forward ─ learn ─ release
                      │                                          │
                      │                               UpstreamClient (dns/upstream.py)
                      │                                          │
                      ▼                                          ▼
                   AuditLog, Metrics (observe/)            upstream DNS server

Policies (decide), the allow-map writer (learn) and transparent redirection slot into the
Proxy's Decider, Learner and Router; until their issues land, the agent runs in explicit mode
with every query allowed.

Signals: SIGTERM or SIGINT stop cleanly (a second SIGINT forces exit); SIGHUP reopens the audit
file for logrotate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

from fqdnproxy import config as config_mod
from fqdnproxy import proxy as proxy_mod
from fqdnproxy.config import AgentConfig
from fqdnproxy.dns import server as server_mod
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.observe import audit as audit_mod
from fqdnproxy.observe import dnstap as dnstap_mod
from fqdnproxy.observe.metrics import Metrics

log = logging.getLogger("fqdnproxy")


class StartupError(FqdnproxyError):
    """The agent could not start."""


@dataclass
class Agent:
    """All running components of one agent."""

    config: AgentConfig
    metrics: Metrics = field(default_factory=Metrics)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    server: server_mod.DnsServer | None = None
    upstream: upstream_mod.UpstreamClient | None = None
    audit: audit_mod.JsonLinesAuditLog | audit_mod.NullAuditSink | None = None
    dnstap: list[dnstap_mod.DnstapSink] = field(default_factory=list)
    _interrupts: int = 0

    async def startup(self) -> None:
        """Build and start every component, in dependency order.

        Raises:
            StartupError: a listener could not bind, the audit file could not be opened, ...
        """
        cfg = self.config
        try:
            self.audit = (audit_mod.JsonLinesAuditLog(cfg.audit.path, cfg.audit.queue_size,
                                                      self.metrics)
                          if cfg.audit.path else audit_mod.NullAuditSink())
        except OSError as error:
            raise StartupError(f"audit.path {cfg.audit.path!r}: {error.strerror}") from None
        try:
            self.dnstap = dnstap_mod.open_sinks(cfg.audit.dnstap_file, cfg.audit.dnstap_socket,
                                                cfg.audit.queue_size, self.metrics)
        except OSError as error:
            self.audit.close()
            raise StartupError(
                f"audit.dnstap_file {cfg.audit.dnstap_file!r}: {error.strerror}") from None
        sink = audit_mod.TeeAuditSink(self.audit, *self.dnstap) if self.dnstap else self.audit
        self.upstream = upstream_mod.UpstreamClient(_upstream_settings(cfg), self.metrics)
        await self.upstream.start()
        servers = [config_mod.parse_address(text) for text in cfg.upstream.servers]
        handler = proxy_mod.Proxy(
            self.upstream, proxy_mod.RoundRobinUpstreams(servers), sink, self.metrics,
            proxy_mod.ProxySettings(max_in_flight=cfg.dns.max_in_flight))
        listen = [config_mod.parse_address(text, allow_port_zero=True) for text in cfg.dns.listen]
        self.server = server_mod.DnsServer(listen, handler.handle, self.metrics,
                                           _listener_limits(cfg), tcp=cfg.dns.tcp)
        try:
            await self.server.start()
        except OSError as error:
            await self.shutdown()
            raise StartupError(f"dns.listen: cannot bind: {error}") from None
        if cfg.metrics.listen:
            self._start_metrics_endpoint(cfg.metrics.listen)
        for protocol, ip, port in self.server.bound:
            log.info("listening on %s %s", protocol, _format(ip, port))
        log.info("forwarding to %s", ", ".join(cfg.upstream.servers))

    def _start_metrics_endpoint(self, listen: str) -> None:
        from prometheus_client import start_http_server

        ip, port = config_mod.parse_address(listen, allow_port_zero=True)
        try:
            start_http_server(port, addr=ip, registry=self.metrics.registry)
        except OSError as error:
            raise StartupError(f"metrics.listen: cannot bind {listen}: {error}") from None
        log.info("metrics on http://%s/metrics", _format(ip, port))

    async def shutdown(self) -> None:
        """Stop listening, settle what is in flight, flush the audit log."""
        if self.server is not None:
            await self.server.stop()
        if self.upstream is not None:
            await self.upstream.close()
        if self.audit is not None:
            self.audit.close()
        for sink in self.dnstap:
            sink.close()
        log.info("stopped")

    def capture_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._reopen_audit)

    def _interrupt(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("second interrupt: exiting now")
            os._exit(1)
        self.stopping.set()

    def _reopen_audit(self) -> None:
        if isinstance(self.audit, audit_mod.JsonLinesAuditLog):
            self.audit.reopen()

    async def serve(self) -> None:
        """Start, run until a stop signal, stop."""
        await self.startup()
        self.capture_signals()
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()


def _upstream_settings(cfg: AgentConfig) -> upstream_mod.UpstreamSettings:
    u = cfg.upstream
    return upstream_mod.UpstreamSettings(
        timeout=u.timeout, sockets_per_server=u.sockets_per_server,
        socket_max_queries=u.socket_max_queries, socket_max_age=u.socket_max_age,
        max_servers=u.max_servers)


def _listener_limits(cfg: AgentConfig) -> server_mod.ListenerLimits:
    d = cfg.dns
    return server_mod.ListenerLimits(
        tcp_max_connections=d.tcp_max_connections, tcp_idle_timeout=d.tcp_idle_timeout,
        tcp_message_timeout=d.tcp_message_timeout,
        tcp_max_queries_per_connection=d.tcp_max_queries_per_connection)


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def run(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT, on uvloop.

    Raises:
        StartupError: the agent could not start.
    """
    import uvloop

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(Agent(cfg).serve())
