"""The composition root: builds the components, wires them, starts, reloads and stops them.

The path of one query through what is wired here (DESIGN.md, "The path of one query"):

    pod ──query──► DnsServer (dns/server.py: UDP/TCP listeners)
                      │ data, Client
                      ▼
                   Proxy.receive (proxy.py) read ─ admit ─ decide ─ forward ─ learn ─ release
                                                     │         │         │
                             PolicyDecider (policy/) ┘         │         └ AllowLearner (fqdn/)
                             source IP -> endpoint -> rule     │           cache -> allow map
                                                               ▼           (datapath/, kernel)
                                              UpstreamClient (dns/upstream.py) -> DNS server
                   every exchange -> audit sinks (JSON lines, dnstap) and metrics (observe/)

Beside the query path, background tasks on the same loop: policy reload (file reads in a
thread, then re-evaluation of what is cached), garbage collection of expired entries in bounded
steps, the periodic cache snapshot, and the admin API on a unix socket.

Without ``policy.directory`` the agent forwards every query and learns nothing (explicit mode in
front of a resolver). With it, queries are decided per endpoint and answers teach the cache;
with ``datapath.enabled`` too, what they teach goes into the kernel's allow map before release.

Restarts. A successor that finds a running agent (the handover socket) compiles its program
while the running agent serves, then takes its listening sockets over (handover.py): no query is
lost. A start after a crash or a kill -9 finds no one to take over from, but usually finds the
pinned maps, with the previous agent's program still attached and enforcing from them. It then
does not wait for bcc (seconds of clang): it opens the pins (``EgressDatapath.open``), restores
the cache, syncs endpoints and static rules, binds and serves DNS at once, learning into the
pinned maps before each release as always (the attached program reads them), while
``_load_program`` compiles this build's program in a thread and then replaces the old one on
every interface (``tc filter replace``: no packet sees an interface unfiltered). /readyz says
``datapath: no`` until then, and drop events are read from then on. If that compile or attach
fails the agent logs why, counts it (``fqdnproxy_datapath_program_loads_total{result="error"}``)
and exits with status 3 so its supervisor restarts it; it leaves the redirection, the pinned maps
and the old program in place, so enforcement goes on and pods' DNS is never sent unjudged. On a
first start (no pins) the agent compiles before it serves, as bcc creates the maps.

DNS workers (``dns.workers`` > 1, workers.py). This process is worker 0, the primary; once its
listeners are bound and its program loaded it starts the others, the same command line with
``FQDNPROXY_WORKER=k``. An ``Agent`` with ``worker`` > 0 wires the same query path on the same
listeners (SO_REUSEPORT) with its own cache and exact allow map, and leaves out what is
node-wide: the program, the policy's kernel maps, the redirection, drop events and the handover
(``primary``). Each worker serves an admin socket of its own, which the primary's asks.

Signals: SIGTERM or SIGINT stop cleanly (a second SIGINT forces exit); SIGHUP reopens the audit
file for logrotate. A stop leaves the pinned maps and the attached program in place: enforcement
and learned entries outlive the agent, and the next agent takes them over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fqdnproxy import config as config_mod
from fqdnproxy import exchange, handover
from fqdnproxy import proxy as proxy_mod
from fqdnproxy import ratelimit, workers
from fqdnproxy.admin import commands as admin_commands
from fqdnproxy.admin.server import AdminServer
from fqdnproxy.config import AgentConfig
from fqdnproxy.datapath.allowmap import AllowMapWriter, NullAllowMap, kernel_now_ns
from fqdnproxy.dns import server as server_mod
from fqdnproxy.dns import upstream as upstream_mod
from fqdnproxy.dns import wire
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.fqdn import snapshot
from fqdnproxy.fqdn.cache import RESTORED, CacheLimits, FqdnCache
from fqdnproxy.fqdn import learner as learner_mod
from fqdnproxy.fqdn.learner import AllowLearner, LearnSettings
from fqdnproxy.observe import audit as audit_mod
from fqdnproxy.observe import dnstap as dnstap_mod
from fqdnproxy.observe import drops as drops_mod
from fqdnproxy.observe import gc_pauses
from fqdnproxy.observe import http as http_mod
from fqdnproxy.observe.metrics import Metrics
from fqdnproxy.policy import audit_mode
from fqdnproxy.policy.decider import PolicyDecider
from fqdnproxy.policy.reload import PolicyStore

log = logging.getLogger("fqdnproxy")

# Entries copied per event-loop step while snapshotting; each one's IP is turned back into text
# then (the cache holds integer keys), about a microsecond: 2,000 keep a step near 2 ms.
SNAPSHOT_CHUNK = 2_000


class StartupError(FqdnproxyError):
    """The agent could not start."""


class ProgramLoadError(StartupError):
    """The datapath program, compiled in the background after a restart, could not be loaded."""


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
    store: PolicyStore | None = None
    cache: FqdnCache | None = None
    learner: AllowLearner | None = None
    datapath: Any = None  # datapath.egress.EgressDatapath when enabled
    admin: AdminServer | None = None
    http: http_mod.MetricsHttpServer | None = None  # /metrics, /healthz, /readyz
    readiness: http_mod.Readiness = field(default_factory=http_mod.Readiness)
    drops: drops_mod.DropAuditor | None = None  # datapath drop events -> audit log
    started: float = field(default_factory=time.time)
    last_reload: admin_commands.ReloadRecord | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _applied: Any = None  # datapath.policy_sync.DesiredState last written
    _redirected: Any = None  # datapath.redirect.Redirect installed
    handover_server: handover.HandoverServer | None = None
    _succeeded: bool = False  # a new agent took over: leave the redirection and snapshot alone
    _program_task: asyncio.Task[None] | None = None  # compiling the program after a restart
    failure: StartupError | None = None  # why the agent stops on its own; serve() raises it
    # Awaited before the program is compiled in the background (a restart over existing pins):
    # a test holds the compile with it to look at the datapath meanwhile.
    program_gate: Callable[[], Awaitable[None]] | None = None
    _interrupts: int = 0
    _gc_recorder: gc_pauses.GcPauseRecorder | None = None
    _snapshot_failures: int = 0  # in a row, since the last snapshot written
    # DNS workers (workers.py): this process's index (0: the primary), the command line the
    # primary starts the others with, and its supervisor of them.
    worker: int = 0
    worker_command: Sequence[str] = ()
    supervisor: workers.WorkerSupervisor | None = None
    _worker_lock: int | None = None  # a worker's lock fd, held while it runs (workers.claim)

    @property
    def primary(self) -> bool:
        """Whether this process owns the node-wide parts: program, policy maps, redirection,
        drop events, handover (workers.py)."""
        return self.worker == 0

    # --- start ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Build and start every component, in dependency order.

        Raises:
            StartupError: a listener could not bind, a policy file is invalid, ...
        """
        cfg = self.config
        self._gc_recorder = gc_pauses.GcPauseRecorder(self.metrics.registry).install()
        successor = bool(self._handover_path()) and handover.peer_running(
            Path(self._handover_path()))
        # First, so /healthz answers and /readyz says what startup waits for; when taking over
        # from a running agent, its port is free only after the handover.
        if cfg.dns.workers > 1 and self.primary and not self.worker_command:
            raise StartupError("dns.workers above 1 needs the agent started by `fqdnproxy run`: "
                               "its workers run the same command")
        if cfg.metrics.listen and not successor:
            self._start_metrics_endpoint(cfg.metrics.listen)
        if not self.primary:
            await self._claim_worker()
        sink = self._open_audit()
        decider: exchange.Decider = exchange.AllowAll()
        learner: exchange.Learner = exchange.NoLearning()
        inherited = None
        if cfg.policy.directory:
            self.store = self._load_policies()
            self.datapath = self._open_datapath(successor) if cfg.datapath.enabled else None
            if self.datapath is not None and not self.datapath.program_loaded:
                self._program_task = asyncio.get_running_loop().create_task(
                    self._load_program())
            self.learner = self._build_learner()
            inherited = await self._take_over() if successor else None
            self._restore()
            if self.datapath is not None and self.primary:
                await self._sync_datapath(initial=True)
                # Node-wide (the program's counters, the maps): exported by the primary alone.
                self.metrics.watch_datapath(self.datapath)
            policy_decider = PolicyDecider(lambda: self._store().current)
            self.metrics.watch_decisions(policy_decider)
            decider = audit_mode.AuditModeDecider(policy_decider,
                                                  self._audited)
            learner = self.learner
        self.readiness.mark("policies", "cache")
        if self._program_task is None:  # else _load_program says when the program is ready
            self._program_ready()
        if successor and inherited is None:
            inherited = await self._take_over()
        if cfg.metrics.listen and successor:
            self._start_metrics_endpoint(cfg.metrics.listen)
        self.upstream = upstream_mod.UpstreamClient(_upstream_settings(cfg), self.metrics)
        await self.upstream.start()
        servers = [config_mod.parse_address(text) for text in cfg.upstream.servers]
        router: proxy_mod.Router = proxy_mod.RoundRobinUpstreams(servers)
        own: set[tuple[str, int]] = set()  # filled once the listeners are bound
        transparent = []
        if cfg.dns.mode == "transparent":
            router = proxy_mod.OriginalDestination(own, router)
            transparent = [("127.0.0.1", cfg.dns.transparent_port),
                           ("::1", cfg.dns.transparent_port)]
        handler = proxy_mod.Proxy(
            self.upstream, router, sink, self.metrics,
            proxy_mod.ProxySettings(max_in_flight=cfg.dns.max_in_flight,
                                    deny_rcode=_deny_rcode(cfg), rate_limit=_rate_limit(cfg),
                                    parse_cache_size=cfg.dns.parse_cache_size),
            decider=decider, learner=learner)
        listen = [config_mod.parse_address(text, allow_port_zero=True) for text in cfg.dns.listen]
        self.server = server_mod.DnsServer(listen, handler.handle, self.metrics,
                                           _listener_limits(cfg), tcp=cfg.dns.tcp,
                                           transparent=transparent, receive=handler.receive,
                                           workers=cfg.dns.workers)
        try:
            await self.server.start(inherited)
        except OSError as error:
            await self.shutdown()
            raise StartupError(f"dns.listen: cannot bind: {error}") from None
        own.update((ip, port) for protocol, ip, port in self.server.bound
                   if "transparent" not in protocol)
        if transparent and self.primary:
            await self._redirect()
        await self._start_admin()
        if self.primary:
            self._offer_handover()
        self._start_background_tasks()
        self.readiness.mark("listeners")
        self._start_workers()
        for protocol, ip, port in self.server.bound:
            log.info("listening on %s %s", protocol, _format(ip, port))
        log.info("forwarding to %s", ", ".join(cfg.upstream.servers))
        frozen = gc_pauses.freeze_startup_objects()
        log.info("gc: %d objects made at startup left out of later collections", frozen)

    # --- restarts without losing DNS (see handover.py) -----------------------------------------

    async def _take_over(self) -> list[server_mod.ListenerSocket] | None:
        path = Path(self._handover_path())
        try:
            inherited = await asyncio.to_thread(handover.take_over, path)
        except handover.HandoverError as error:
            raise StartupError(str(error)) from None
        if inherited:
            log.info("took over %d listening sockets from the running agent", len(inherited))
        return inherited

    def _handover_path(self) -> str:
        if not self.primary:
            return ""  # the primary hands over; it stops its workers and the successor starts its own
        state = self.config.state
        if state.handover_socket != "auto":
            return state.handover_socket
        return f"{state.admin_socket}.handover" if state.admin_socket else ""

    def _offer_handover(self) -> None:
        path = self._handover_path()
        if path:
            self.handover_server = handover.HandoverServer(
                Path(path), self._prepare_handover, self._handed_over)
            self.handover_server.start()

    async def _prepare_handover(self) -> list[server_mod.ListenerSocket]:
        """A successor asks: give it a fresh snapshot and the ports it needs, then the sockets."""
        log.info("a new agent takes over")
        self.readiness.stopping()
        if self._program_task is not None and not self._program_task.done():
            # Our program, still compiling, must never replace the successor's, which it
            # attaches after this (timeline: we hand over, it syncs and attaches).
            self.datapath.cancel_load()
            self._program_task.cancel()
        if self.cache is not None:
            await self.write_snapshot()
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.http is not None:
            self.http.close()
            self.http = None
        assert self.server is not None
        return self.server.sockets

    async def _handed_over(self) -> None:
        """The successor has the sockets: stop reading them, finish what is in flight, exit."""
        assert self.server is not None
        self.server.stop_listening()
        await self.server.drain(self.config.upstream.timeout + 1.0)
        self._succeeded = True
        self.stopping.set()

    def _open_audit(self) -> audit_mod.AuditSink:
        cfg = self.config
        try:
            self.audit = (audit_mod.JsonLinesAuditLog(cfg.audit.path, cfg.audit.queue_size,
                                                      self.metrics)
                          if cfg.audit.path else audit_mod.NullAuditSink())
        except OSError as error:
            raise StartupError(f"audit.path {cfg.audit.path!r}: {error.strerror}") from None
        # A dnstap file is one Frame Streams stream: each worker writes its own (path.worker-k).
        dnstap_file = cfg.audit.dnstap_file
        if dnstap_file and not self.primary:
            dnstap_file = f"{dnstap_file}.worker-{self.worker}"
        try:
            self.dnstap = dnstap_mod.open_sinks(dnstap_file, cfg.audit.dnstap_socket,
                                                cfg.audit.queue_size, self.metrics)
        except OSError as error:
            self.audit.close()
            raise StartupError(
                f"audit.dnstap_file {cfg.audit.dnstap_file!r}: {error.strerror}") from None
        return audit_mod.TeeAuditSink(self.audit, *self.dnstap) if self.dnstap else self.audit

    def _load_policies(self) -> PolicyStore:
        cfg = self.config.policy
        # A change is read once its files have been still for half a reload interval (at most
        # 1 s): a file caught half-written is never taken for a complete one.
        store = PolicyStore(cfg.directory, cfg.endpoints, settle=min(1.0, cfg.reload_interval / 2))
        try:
            current = store.load()
        except FqdnproxyError as error:
            raise StartupError(f"policies rejected:\n{error}") from None
        for warning in current.warnings:
            log.warning("policy: %s", warning)
        self.metrics.child(self.metrics.policy_reloads, "loaded").inc()
        self.last_reload = admin_commands.ReloadRecord(time.time(), "loaded", current.version)
        log.info("policies: %d loaded, %d endpoints", len(current.policy_set.policies),
                 len(list(current.registry.workloads())))
        return store

    def _open_datapath(self, successor: bool) -> Any:
        """The datapath: over existing pins without waiting for bcc, else compiled first.

        A successor compiles first: the running agent serves meanwhile, and it hands over to
        an agent whose program is in place. Otherwise existing pins are taken over at once and
        the program follows (``_load_program``); a first start compiles, since bcc makes the maps.
        """
        from fqdnproxy.datapath import egress

        pin_dir = Path(self.config.datapath.pin_dir)
        options = egress.Options(allow_max=self.config.datapath.allow_max,
                                 ct_max=self.config.datapath.ct_max,
                                 workers=self.config.dns.workers)
        if not self.primary:
            return self._open_worker_datapath(pin_dir, options)
        _warn_pinned_sizes(pin_dir, options)
        self._unpin_extra_worker_maps(pin_dir)
        try:
            datapath = None if successor else egress.EgressDatapath.open(pin_dir, options)
        except FqdnproxyError as error:
            raise StartupError(f"datapath: {error}") from None
        if datapath is not None:
            log.info("datapath: took over the maps pinned in %s; the program attached there "
                     "enforces from them until this agent's, compiling now, replaces it", pin_dir)
            return datapath
        started = time.monotonic()
        try:
            datapath = egress.EgressDatapath.load(pin_dir, options)
        except FqdnproxyError as error:
            self.metrics.child(self.metrics.program_loads, "error").inc()
            raise StartupError(f"datapath: {error}") from None
        self._count_program_load(time.monotonic() - started)
        return datapath

    def _open_worker_datapath(self, pin_dir: Path, options: Any) -> Any:
        """A worker's datapath: the pins the primary made, this worker's exact map; never
        the program (the primary's)."""
        from fqdnproxy.datapath import egress

        try:
            datapath = egress.EgressDatapath.open(pin_dir, options, worker=self.worker)
        except FqdnproxyError as error:
            raise StartupError(f"datapath: {error}") from None
        if datapath is None:
            raise StartupError(f"datapath: nothing is pinned in {pin_dir} (the primary makes "
                               "the maps before it starts its workers)")
        return datapath

    def _unpin_extra_worker_maps(self, pin_dir: Path) -> None:
        from fqdnproxy.datapath import pinned

        if pin_dir.is_dir():
            removed = pinned.unpin_worker_maps(pin_dir, self.config.dns.workers)
            if removed:
                log.info("datapath: unpinned %s, left by an agent with more DNS workers",
                         ", ".join(removed))

    async def _load_program(self) -> None:
        """Compile and load this build's program off the loop, then swap it in on every
        interface; on failure stop the agent (``failure``, exit status 3).

        Meanwhile DNS is served and learned into the pinned maps, which the program attached
        by the previous agent reads; an interface attached meanwhile (a new endpoint) is
        attached here, once there is a program to attach.
        """
        assert self.datapath is not None
        if self.program_gate is not None:
            await self.program_gate()
        started = time.monotonic()
        try:
            attached = await asyncio.to_thread(self.datapath.load_program)
        except Exception as error:  # whatever it is, the agent must not run half-working
            self.metrics.child(self.metrics.program_loads, "error").inc()
            log.error("datapath: cannot load this agent's program: %s. Stopping (exit status "
                      "3) for the supervisor to restart the agent; the program attached before "
                      "goes on enforcing from the pinned maps, and the DNS redirection stays",
                      error, exc_info=not isinstance(error, FqdnproxyError))
            self.failure = ProgramLoadError(f"datapath program: {error}")
            self.stopping.set()
            return
        seconds = time.monotonic() - started
        self._count_program_load(seconds)
        log.info("datapath: program compiled in %.1f s and attached to %s, replacing the "
                 "previous one", seconds, ", ".join(map(str, attached)) or "no interface yet")
        self._program_ready()
        self._start_workers()

    def _count_program_load(self, seconds: float) -> None:
        self.metrics.child(self.metrics.program_loads, "ok").inc()
        self.metrics.program_load_seconds.set(seconds)

    def _program_ready(self) -> None:
        """This agent's program is attached (or there is no datapath): ready on that count,
        and its drop events go to the audit log."""
        if self.datapath is not None and self.primary:
            self.metrics.program_attached.set(1)
            cfg = self.config.audit
            limiter = drops_mod.DropLimiter(cfg.drop_rate, cfg.drop_burst, self._identity)
            self.drops = drops_mod.DropAuditor(self.datapath, self.audit, limiter,
                                               self.metrics).start()
        self.readiness.mark("datapath")

    def _build_learner(self) -> AllowLearner:
        cfg = self.config.cache
        self.cache = FqdnCache(CacheLimits(cfg.max_ips_per_name, cfg.max_names_per_endpoint,
                                           cfg.max_entries))
        self.metrics.watch_cache(self.cache, learner_mod.memo_sizes)
        writer: AllowMapWriter = self.datapath if self.datapath is not None else NullAllowMap()
        return AllowLearner(self.cache, _TimedWriter(writer, self.metrics), self._policy_for,
                            LearnSettings(min_ttl=cfg.min_ttl, ttl_headroom=cfg.ttl_headroom,
                                          report_allowed=bool(self.config.audit.path)))

    def _restore(self) -> None:
        """Snapshot first (names), then whatever the pinned map holds beyond it (restored)."""
        assert self.cache is not None and self.learner is not None
        now = kernel_now_ns()
        loaded = snapshot.load(self._snapshot_directory(), now, snapshot.boot_id())
        restored = self.cache.restore(loaded.entries)
        log.info("cache: %d entries restored from the snapshot (%s; %d had expired)",
                 restored, loaded.note or "ok", loaded.expired)
        if self.datapath is not None:
            extra = 0
            for entry in self.datapath.dump():
                ip = str(entry.network.network_address)
                if (entry.key.exact and entry.expiry_ns > now
                        and not self.cache.holders(entry.endpoint_id, ip)):
                    self.cache.learn(entry.endpoint_id, RESTORED, [(ip, entry.expiry_ns)])
                    self.learner.keep_restored(entry)
                    extra += 1
            log.info("cache: %d map entries without a name kept as %r until they expire",
                     extra, RESTORED)
        self.learner.reevaluate()

    async def _redirect(self) -> None:
        """Install (or replace) the TPROXY rules for the enforced endpoints' interfaces."""
        from fqdnproxy.datapath import redirect

        current = self._store().current
        interfaces = redirect.interfaces_of([
            endpoint.interface for endpoint in current.registry.workloads()
            if endpoint.interface and current.engine.for_endpoint(endpoint).enforced])
        rules = redirect.Redirect(interfaces, self.config.dns.transparent_port)
        if rules == self._redirected:
            return
        try:
            await asyncio.to_thread(redirect.install, rules)
        except FqdnproxyError as error:
            raise StartupError(f"dns.mode transparent: {error}") from None
        self._redirected = rules
        log.info("redirecting DNS from %s to port %d", ", ".join(interfaces) or "no interface",
                 rules.port)

    async def _unredirect(self) -> None:
        from fqdnproxy.datapath import redirect

        if self._redirected is None:
            return
        try:
            await asyncio.to_thread(redirect.remove)
        except FqdnproxyError as error:
            log.error("could not remove the DNS redirection: %s", error)
        self._redirected = None

    def _dns_targets(self) -> list[tuple[str, int]]:
        """Where enforced endpoints may always send DNS: the proxy's listeners and the
        inventory's DNS services (port 53; transparent redirection hands those to the proxy)."""
        targets = [config_mod.parse_address(text, allow_port_zero=True)
                   for text in self.config.dns.listen]
        for endpoint in self._store().current.registry:
            if endpoint.kind == "service":
                targets += [(ip, 53) for ip in endpoint.ips]
        if self.config.dns.mode == "transparent":
            # Any server on port 53 (the all-zero address): the node redirects every such query
            # to the proxy, which judges it against rules.dns.
            targets += [("0.0.0.0", 53), ("::", 53)]
        return [(ip, port) for ip, port in targets if port]

    async def _sync_datapath(self, initial: bool = False) -> None:
        """Write what the current policies say (endpoints, static rules) into the datapath.

        At start the previous state is read back from the pinned maps, so rules removed while
        the agent was down are removed too. The desired state is computed on the loop (it reads
        the cache); writing it runs in a thread: netlink (tc attach) and batches of map writes
        must not stall queries. A learned entry overwritten meanwhile is rewritten by the
        re-evaluation that follows every reload.
        """
        from fqdnproxy.datapath import policy_sync

        assert self.learner is not None
        current = self._store().current
        desired = policy_sync.desired_state(current.engine, current.registry,
                                            self.learner.entry_for, self._dns_targets(),
                                            audited=self._audited)
        previous = policy_sync.current_state(self.datapath) if initial else self._applied
        applied = await asyncio.to_thread(policy_sync.apply, self.datapath, desired, previous)
        if initial:
            for name in self.config.datapath.interfaces:
                await asyncio.to_thread(self.datapath.attach, name)
        self._applied = desired
        for name in desired.missing_interfaces:
            log.warning("datapath: interface %s of the inventory is not here; its endpoint is "
                        "enforced by source address only, without anti-spoofing", name)
        log.info("datapath: %d endpoints set, %d removed, %d static entries written, %d deleted,"
                 " %s %s", applied.endpoints_set, applied.endpoints_removed,
                 applied.entries_written, applied.entries_deleted,
                 "attached to" if self.datapath.program_loaded else "to attach once loaded:",
                 ", ".join(applied.attached) or "nothing new")

    def _start_metrics_endpoint(self, listen: str) -> None:
        ip, port = config_mod.parse_address(listen, allow_port_zero=True)
        if port:
            port += self.worker  # worker k serves its own metrics on the next ports
        try:
            self.http = http_mod.MetricsHttpServer(ip, port, self.metrics.registry,
                                                   self.readiness).start()
        except OSError as error:
            raise StartupError(f"metrics.listen: cannot bind {listen}: {error}") from None
        log.info("metrics on http://%s/metrics (and /healthz, /readyz)",
                 _format(*self.http.address))

    async def _start_admin(self) -> None:
        """The admin socket; worker k's is the primary's path + ``.worker-k``, and the primary
        asks the workers' for what each holds alone (their caches: admin/commands.py)."""
        path = self.config.state.admin_socket
        if not path:
            return
        if not self.primary:
            path = _worker_admin_socket(path, self.worker)
        others = ([Path(_worker_admin_socket(self.config.state.admin_socket, k))
                   for k in range(1, self.config.dns.workers)] if self.primary else [])
        self.admin = AdminServer(Path(path), admin_commands.handlers(self, others))
        try:
            await self.admin.start()
        except OSError as error:
            await self.shutdown()
            raise StartupError(f"state.admin_socket {path!r}: {error}") from None
        log.info("admin socket %s", path)

    def _start_background_tasks(self) -> None:
        if self.store is not None:
            self._spawn(self._reload_forever())
        if self.learner is not None:
            self._spawn(self._collect_garbage_forever())
            self._spawn(self._snapshot_forever())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    # --- background ------------------------------------------------------------------------------

    async def _reload_forever(self) -> None:
        interval = self.config.policy.reload_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # a failed reload must never stop the next one
                log.exception("policy reload failed")

    async def reload(self) -> str:
        """Check the policy files and inventory; apply a valid change. The result's status."""
        result = await asyncio.to_thread(self._store().check_for_changes)
        if result.status == "unchanged":
            return result.status
        self.metrics.child(self.metrics.policy_reloads, result.status).inc()
        self.last_reload = admin_commands.ReloadRecord(time.time(), result.status,
                                                       result.current.version, result.errors)
        if result.status == "rejected":
            for error in result.errors:
                log.error("policy change rejected, previous version keeps serving: %s", error)
            return result.status
        for warning in result.warnings:
            log.warning("policy: %s", warning)
        if self.datapath is not None and self.primary:
            await self._sync_datapath()
        if self._redirected is not None:
            await self._redirect()
        if self.learner is not None:
            changed = self.learner.reevaluate()
            log.info("policies reloaded (version %d); %d cached entries re-evaluated",
                     result.current.version, changed)
        return result.status

    async def _collect_garbage_forever(self) -> None:
        assert self.learner is not None
        cfg = self.config.cache
        while True:
            await asyncio.sleep(cfg.gc_interval)
            while True:
                started = time.perf_counter()
                removed = self.learner.collect_garbage(kernel_now_ns(), cfg.gc_batch)
                self.metrics.gc_step.observe(time.perf_counter() - started)
                self.metrics.gc_deleted.inc(removed)
                if removed < cfg.gc_batch:
                    break
                await asyncio.sleep(0)  # let queries through between steps

    async def _snapshot_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.state.snapshot_interval)
            await self.write_snapshot()

    async def write_snapshot(self) -> bool:
        """Copy the cache in bounded steps, then encode and write it off the loop."""
        assert self.cache is not None
        entries: list[tuple[int, str, str, int]] = []
        for chunk in self.cache.snapshot_chunks(SNAPSHOT_CHUNK):
            entries.extend(chunk)
            await asyncio.sleep(0)
        try:
            document = await asyncio.to_thread(
                snapshot.encode, entries, kernel_now_ns(), time.time(), snapshot.boot_id())
            await asyncio.to_thread(snapshot.save, self._snapshot_directory(), document)
        except snapshot.SnapshotError as error:
            self.metrics.child(self.metrics.snapshots, "error").inc()
            self._snapshot_failures += 1
            log.error("snapshot: %s (DNS keeps working; the pinned map keeps enforcing; the "
                      "last snapshot written stays in place)", error)
            return False
        self.metrics.child(self.metrics.snapshots, "ok").inc()
        if self._snapshot_failures:
            log.info("snapshot: written again after %d failed attempts", self._snapshot_failures)
            self._snapshot_failures = 0
        return True

    # --- stop ------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop listening, settle what is in flight, snapshot, flush the audit log."""
        self.readiness.stopping()
        if self._gc_recorder is not None:
            self._gc_recorder.remove()
        if self.handover_server is not None:
            self.handover_server.close()
        if self._program_task is not None:
            self._program_task.cancel()  # a compile under way is released by datapath.close()
        if not self._succeeded and self.failure is None:
            # First: pods' DNS goes straight to their servers again. Not when the agent stops
            # for its supervisor to restart it: the next agent takes the redirection over.
            await self._unredirect()
        if self.server is not None and not self.primary:
            # The other workers (a successor's, after a handover) share the listeners: let go
            # of them without dropping what this one holds.
            await self.server.leave(self.config.upstream.timeout)
        if self.server is not None:
            await self.server.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.cache is not None and not self._succeeded:  # the successor snapshots now
            await self.write_snapshot()
        if self.upstream is not None:
            await self.upstream.close()
        if self.admin is not None:
            await self.admin.stop()
        if self.drops is not None:
            await asyncio.to_thread(self.drops.stop)  # before the audit log and the datapath
        if self.audit is not None:
            self.audit.close()
        for sink in self.dnstap:
            sink.close()
        if self.datapath is not None:
            self.datapath.close()  # pins and attached filters stay: enforcement goes on
        if self.http is not None:
            self.http.close()
        if self._worker_lock is not None:
            os.close(self._worker_lock)  # the next worker k may start
            self._worker_lock = None
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
        """Start, run until a stop signal, stop.

        Raises:
            StartupError: the agent could not start, or (``ProgramLoadError``) its program,
                compiled after a restart over existing pins, could not be loaded.
        """
        await self.startup()
        self.capture_signals()
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()
        if self.failure is not None:
            raise self.failure

    # --- helpers ---------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        """The primary starts its DNS workers once its listeners are bound and its program is
        loaded (a worker opens its exact map, which the program's compile pins)."""
        if (not self.primary or self.config.dns.workers <= 1 or self.supervisor is not None
                or self.stopping.is_set() or self.server is None or not self.server.bound
                or (self.datapath is not None and not self.datapath.program_loaded)):
            return
        supervisor = self.supervisor = workers.WorkerSupervisor(
            self.config.dns.workers, self.worker_command,
            restarted=lambda index: self.metrics.worker_restarts.labels(str(index)).inc())
        self.metrics.workers_running.set_function(lambda: len(supervisor.pids()))
        supervisor.start()

    async def _claim_worker(self) -> None:
        """Be worker k alone: wait for a predecessor worker k (a handover's) to exit."""
        try:
            self._worker_lock = await asyncio.to_thread(
                workers.claim, self._snapshot_directory(), self.config.upstream.timeout + 30.0)
        except workers.WorkerError as error:
            raise StartupError(str(error)) from None

    def _snapshot_directory(self) -> Path:
        """Where this process's cache snapshot lives: worker k's in a directory of its own."""
        directory = Path(self.config.state.directory)
        return directory if self.primary else directory / f"worker-{self.worker}"

    def _store(self) -> PolicyStore:
        assert self.store is not None
        return self.store

    def _audited(self, endpoint: Any) -> bool:
        return audit_mode.audited(endpoint, self.config.policy.audit_mode)

    def _identity(self, endpoint_id: int) -> dict[str, Any] | None:
        """How audit records name an endpoint id (any thread: one attribute read)."""
        endpoint = self._store().current.registry.by_id(endpoint_id)
        return endpoint.identity if endpoint is not None else None

    def _policy_for(self, endpoint_id: int) -> object | None:
        current = self._store().current
        endpoint = current.registry.by_id(endpoint_id)
        return current.engine.for_endpoint(endpoint) if endpoint is not None else None


class _TimedWriter:
    """An ``AllowMapWriter`` that times each write (``fqdnproxy_allow_map_update_seconds``)."""

    def __init__(self, writer: AllowMapWriter, metrics: Metrics) -> None:
        self._writer = writer
        self._observe: Callable[[float], None] = metrics.allow_map_update.observe

    def upsert_allows(self, entries: Any) -> None:
        self._timed(self._writer.upsert_allows, entries)

    def upsert_hosts(self, batch: Any) -> None:
        self._timed(self._writer.upsert_hosts, batch)

    def _timed(self, write: Callable[[Any], None], what: Any) -> None:
        started = time.perf_counter()
        try:
            write(what)
        finally:
            self._observe(time.perf_counter() - started)

    def delete_allows(self, keys: Any) -> int:
        return self._writer.delete_allows(keys)


def _rate_limit(cfg: AgentConfig) -> ratelimit.RateLimit | None:
    if not cfg.dns.rate_limit_qps:
        return None
    return ratelimit.RateLimit(cfg.dns.rate_limit_qps, cfg.dns.rate_limit_burst)


def _deny_rcode(cfg: AgentConfig) -> wire.Rcode:
    return wire.Rcode.NXDOMAIN if cfg.policy.deny_response == "nxdomain" else wire.Rcode.REFUSED


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


def _worker_admin_socket(path: str, worker: int) -> str:
    """The admin socket of DNS worker ``worker`` beside the primary's ``path``."""
    return f"{path}.worker-{worker}"


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _warn_pinned_sizes(pin_dir: Path, options: Any) -> None:
    """Say so when maps already pinned have other sizes than configured: the pinned ones stay
    (the kernel cannot resize a map, and replacing it would drop every learned entry)."""
    from fqdnproxy.datapath import pinned

    for name, configured, actual in pinned.size_differences(pin_dir, {
            "allow_exact": options.allow_max, "allow": options.allow_max, "ct": options.ct_max}):
        log.warning("datapath: map %s is pinned with %d entries, the configuration asks for %d; "
                    "the pinned size stays until %s is removed (stop the agent, `rm -r` it, start "
                    "the agent: enforcement pauses until it has reloaded and pods re-resolve)",
                    name, actual, configured, pin_dir)


def run(cfg: AgentConfig, command: Sequence[str] = ()) -> None:
    """Run the agent until SIGTERM or SIGINT, on uvloop. ``command`` is the command line that
    started it, which runs its DNS workers (``dns.workers``; workers.py).

    Raises:
        StartupError: the agent could not start.
    """
    import uvloop

    try:
        worker = workers.this_worker()
        if worker:
            workers.die_with_parent()
    except workers.WorkerError as error:
        raise StartupError(str(error)) from None
    logging.basicConfig(level=cfg.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s"
                               f"{f' [worker {worker}]' if worker else ''}: %(message)s")
    uvloop.run(Agent(cfg, worker=worker, worker_command=command).serve())
