"""AgentConfig: the YAML file plus command-line flags, validated, every default documented.

Each option lives once, as a field of a frozen section dataclass below, with its default, unit
and help text beside it. The YAML keys (``section.field``) and the flags (``--section-field``) are
derived from those fields, so an option is never declared twice. Unknown keys are errors: a typo
in a firewall's configuration must never silently widen anything.

    dns:
      listen: ["127.0.0.1:5353", "[::1]:5353"]
    upstream:
      servers: ["127.0.0.1:53"]
      timeout: 2.0
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

import yaml

from fqdnproxy.datapath.maps import MAX_WORKERS
from fqdnproxy.errors import FqdnproxyError


class ConfigError(FqdnproxyError):
    """Invalid configuration."""


def _opt(default: Any, help: str, unit: str = "") -> Any:
    """A config field: its default, its help text and its unit, side by side."""
    meta = {"help": help, "unit": unit}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DnsConfig:
    """The proxy's listeners and the limits that keep it standing under load."""

    listen: tuple[str, ...] = _opt(
        ["127.0.0.1:5353", "[::1]:5353"], "addresses the proxy listens on, UDP and TCP, IP:PORT"
    )
    mode: Literal["explicit", "transparent"] = _opt(
        "explicit", "explicit: clients send to dns.listen and queries go to upstream.servers; "
        "transparent: also take the DNS of the inventory's enforced endpoints (any server, "
        "port 53) through nftables TPROXY, forward it to the server asked and answer as it")
    transparent_port: int = _opt(
        15353, "local port (on 127.0.0.1 and ::1) that TPROXY hands redirected DNS to", "port")
    tcp: bool = _opt(True, "also listen on TCP (clients retry truncated answers over TCP)")
    workers: int = _opt(
        1, f"processes answering DNS (1 to {MAX_WORKERS}): all listen on dns.listen and the "
        "kernel spreads queries over them; each keeps its own cache and allow map, which the "
        "datapath reads together, and serves its metrics on metrics.listen's port + its index "
        "(README, \"DNS workers\")", "processes")
    max_in_flight: int = _opt(
        10_000, "queries being handled at once; past it new queries get SERVFAIL", "queries"
    )
    rate_limit_qps: float = _opt(
        1_000.0, "queries per second one client address may send; past it REFUSED (0: no "
        "limit). Keeps one noisy pod from starving the others", "queries/s")
    rate_limit_burst: float = _opt(
        2_000.0, "queries a quiet client may send at once before the rate applies", "queries")
    parse_cache_size: int = _opt(
        4_096, "parsed queries and answers remembered (each kind) so a repeat, ID aside, is not "
        "parsed again; the oldest goes when full (0: parse every message)", "messages")
    tcp_max_connections: int = _opt(
        1_000, "open client TCP connections; past it new ones are closed", "connections"
    )
    tcp_idle_timeout: float = _opt(10.0, "close a client TCP connection idle this long", "s")
    tcp_message_timeout: float = _opt(
        5.0, "close a TCP connection whose partial message stalls this long", "s"
    )
    tcp_max_queries_per_connection: int = _opt(
        100, "queries one TCP connection may have in flight at once", "queries"
    )


@dataclass(frozen=True)
class UpstreamConfig:
    """Where allowed queries go in explicit mode, and how they are sent."""

    servers: tuple[str, ...] = _opt(
        ["127.0.0.1:53"], "upstream DNS servers, IP:PORT; queries are spread across them"
    )
    timeout: float = _opt(
        2.0, "give up on an upstream answer after this long (the client then retries)", "s"
    )
    sockets_per_server: int = _opt(
        16, "UDP sockets, each on its own random source port, per upstream server", "sockets"
    )
    socket_max_queries: int = _opt(
        2_000, "rotate a UDP socket (new random port) after this many queries", "queries"
    )
    socket_max_age: float = _opt(60.0, "rotate a UDP socket after this long", "s")
    max_servers: int = _opt(
        256, "distinct upstream servers with open sockets at once (transparent mode)", "servers"
    )


@dataclass(frozen=True)
class AuditConfig:
    """The audit log: one JSON object per exchange; optionally dnstap too."""

    path: str = _opt("-", "where audit records go: a file path, '-' for stdout, '' for none")
    queue_size: int = _opt(
        65_536, "records waiting to be written; past it records are dropped and counted",
        "records",
    )
    dnstap_file: str = _opt(
        "", "also write records as dnstap (Frame Streams) to this file, truncated at start; "
        "'' for none")
    dnstap_socket: str = _opt(
        "", "also send records as dnstap to a Frame Streams reader on this unix socket, "
        "reconnecting while it is absent; '' for none")
    drop_rate: float = _opt(
        10.0, "datapath drop records per endpoint and second (a token bucket); the rest are "
        "counted and reported in the next record or a drop_summary record", "records/s")
    drop_burst: int = _opt(20, "drop records an endpoint may have at once above drop_rate",
                           "records")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    listen: str = _opt("127.0.0.1:9153", "address of /metrics, '' to disable, IP:PORT")


@dataclass(frozen=True)
class PolicyConfig:
    """Which policies and endpoints the agent enforces."""

    directory: str = _opt(
        "", "CiliumNetworkPolicy files: a directory (every *.yaml in it) or one file; '' runs "
        "without policies: every query is forwarded and nothing is learned")
    endpoints: str = _opt("", "the endpoint inventory (YAML); required with policy.directory")
    reload_interval: float = _opt(
        2.0, "check the policy files and inventory for changes this often", "s")
    deny_response: Literal["refused", "nxdomain"] = _opt(
        "refused", "the answer to a denied query: refused, or nxdomain (musl stops its search "
        "list on REFUSED)")
    audit_mode: bool = _opt(
        False, "audit mode for every endpoint: what policies would refuse (queries, packets) is "
        "logged with verdict audit and let through; per endpoint: label "
        "fqdnproxy.io/audit: \"true\" in the inventory")


@dataclass(frozen=True)
class CacheConfig:
    """What answers teach: the per-endpoint FQDN cache and its garbage collection."""

    min_ttl: int = _opt(
        60, "floor on a learned IP's lifetime, so even a TTL-0 answer lets the connection "
        "that follows it (and clients that cache for a while) through", "s")
    ttl_headroom: float = _opt(
        0.1, "a learned IP's entry is written to last its TTL plus this fraction of it, so "
        "repeat lookups within that margin cost no map write (0: write on every lookup)")
    max_ips_per_name: int = _opt(
        1_000, "IPs kept per endpoint and name; past it the soonest to expire goes", "IPs")
    max_names_per_endpoint: int = _opt(
        10_000, "names kept per endpoint; past it the least recently looked up goes", "names")
    max_entries: int = _opt(
        1_000_000, "(endpoint, name, IP) entries in all; past it the soonest to expire goes",
        "entries")
    gc_interval: float = _opt(1.0, "remove expired entries this often", "s")
    gc_batch: int = _opt(
        200, "expired entries removed per step; the loop serves queries between steps",
        "entries")


@dataclass(frozen=True)
class StateConfig:
    """What the agent keeps across restarts, and where it can be asked about it."""

    directory: str = _opt("/var/lib/fqdnproxy", "the cache snapshot's directory")
    snapshot_interval: float = _opt(
        30.0, "write the cache snapshot this often (and at a clean stop)", "s")
    admin_socket: str = _opt(
        "/run/fqdnproxy/admin.sock", "the admin API's unix socket ('' for none)")
    handover_socket: str = _opt(
        "auto", "restarts without losing DNS: a new agent takes the running agent's listening "
        "sockets over this unix socket; 'auto' is the admin socket's path plus '.handover', "
        "'' for none")


@dataclass(frozen=True)
class DatapathConfig:
    """The eBPF egress program and its maps."""

    enabled: bool = _opt(
        False, "load the tc program, attach it to the inventory's interfaces and write "
        "learned IPs to its allow map (needs root and BPF)")
    pin_dir: str = _opt("/sys/fs/bpf/fqdnproxy", "where the maps are pinned (on bpffs)")
    interfaces: tuple[str, ...] = _opt(
        [], "also attach to these interfaces (a LAN gateway: endpoints known by source IP "
        "arrive there); the inventory's endpoint interfaces are attached anyway")
    allow_max: int = _opt(
        262_144, "learned (endpoint, IP) entries the kernel's exact allow map holds (and CIDR "
        "entries its trie holds); past it a learn fails and the answer is SERVFAIL. Fixed when "
        "the maps are first pinned: a new size takes effect once the pin directory is removed",
        "entries")
    ct_max: int = _opt(
        262_144, "flows the kernel tracks (LRU: the least recently seen go first, and their "
        "next packet needs an allow entry again). Fixed when first pinned, like allow_max",
        "flows")


LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``fqdnproxy run`` needs."""

    dns: DnsConfig = field(default_factory=DnsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    state: StateConfig = field(default_factory=StateConfig)
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    log_level: LogLevel = field(
        default="info", metadata={"help": "log level of the agent's own log (stderr)", "unit": ""}
    )


SECTIONS: dict[str, type] = {
    "dns": DnsConfig,
    "upstream": UpstreamConfig,
    "audit": AuditConfig,
    "metrics": MetricsConfig,
    "policy": PolicyConfig,
    "cache": CacheConfig,
    "state": StateConfig,
    "datapath": DatapathConfig,
}


# --- addresses ------------------------------------------------------------------------------


def parse_address(text: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:53"`` or ``"[::1]:53"`` -> ``("::1", 53)``.

    Port 0 (the kernel picks a free port) is accepted only for listening addresses.

    Raises:
        ValueError: not IP:PORT with a valid IP and a port in 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not IP:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ValueError(f"{text!r}: write the IPv4 address itself ({ip.ipv4_mapped}), "
                         "not its IPv4-mapped IPv6 form")
    lowest = 0 if allow_port_zero else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be {lowest}..65535")
    return str(ip), int(port_text)


# --- loading ----------------------------------------------------------------------------------


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read the YAML file (if any), apply ``overrides`` (``"section.field" -> value``), validate.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value; the message
            names the file and the key.
    """
    origin = str(path) if path else "flags"
    document: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        document = loaded
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if key:
            document.setdefault(section, {})
            if not isinstance(document[section], dict):
                raise ConfigError(f"{origin}: {section}: must be a mapping")
            document[section][key] = value
        else:
            document[section] = value
    return _build(document, origin)


def _build(document: Mapping[str, Any], origin: str) -> AgentConfig:
    known = set(SECTIONS) | {"log_level"}
    for key in document:
        if key not in known:
            raise ConfigError(f"{origin}: {key}: unknown key; known: {', '.join(sorted(known))}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = document.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: {name}: must be a mapping")
        sections[name] = _build_section(cls, raw, f"{origin}: {name}")
    level = document.get("log_level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{origin}: log_level: {level!r}; one of {', '.join(LOG_LEVELS)}")
    config = AgentConfig(log_level=level, **sections)
    _validate(config, origin)
    return config


def _build_section(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key; known: {', '.join(fields)}")
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(value, _field_type(cls, key), f"{where}.{key}")
    return cls(**values)


def _field_type(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a YAML or flag value to the field's type, or say what was expected."""
    if get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item, str, f"{where}[{index}]") for index, item in enumerate(value))
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r}; one of {', '.join(choices)}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        return _seconds(value, where)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _seconds(value: Any, where: str) -> float:
    """A duration: a number of seconds, or a string such as ``"500ms"``, ``"2s"``, ``"1m"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite duration, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if text.endswith(suffix):
                text, factor = text[: -len(suffix)], scale
                break
        else:
            factor = 1.0
        try:
            seconds = float(text) * factor
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return seconds
    raise ConfigError(f"{where}: expected a duration such as 2, 2s or 500ms, got {value!r}")


def _validate_workers(config: AgentConfig, origin: str) -> None:
    workers = config.dns.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{origin}: dns.workers: must be 1..{MAX_WORKERS}, got {workers}")
    if workers == 1:
        return
    for index, text in enumerate(config.dns.listen):
        if parse_address(text, allow_port_zero=True)[1] == 0:
            raise ConfigError(f"{origin}: dns.listen[{index}]: port 0 with dns.workers above 1: "
                              "each worker would get a port of its own; name the port")
    if config.metrics.listen:
        port = parse_address(config.metrics.listen, allow_port_zero=True)[1]
        if port and port + workers - 1 > 65535:
            raise ConfigError(f"{origin}: metrics.listen: workers serve metrics on the port + "
                              f"their index, up to {port + workers - 1}: past 65535")


def _validate(config: AgentConfig, origin: str) -> None:
    def check_address(text: str, where: str, listening: bool = False) -> None:
        try:
            parse_address(text, allow_port_zero=listening)
        except ValueError as error:
            raise ConfigError(f"{origin}: {where}: {error}") from None

    for index, text in enumerate(config.dns.listen):
        check_address(text, f"dns.listen[{index}]", listening=True)
    if not config.dns.listen:
        raise ConfigError(f"{origin}: dns.listen: at least one address is needed")
    for index, text in enumerate(config.upstream.servers):
        check_address(text, f"upstream.servers[{index}]")
    if config.metrics.listen:
        check_address(config.metrics.listen, "metrics.listen", listening=True)
    positive = [
        ("dns.max_in_flight", config.dns.max_in_flight),
        ("dns.tcp_max_connections", config.dns.tcp_max_connections),
        ("dns.tcp_idle_timeout", config.dns.tcp_idle_timeout),
        ("dns.tcp_message_timeout", config.dns.tcp_message_timeout),
        ("dns.tcp_max_queries_per_connection", config.dns.tcp_max_queries_per_connection),
        ("upstream.timeout", config.upstream.timeout),
        ("upstream.sockets_per_server", config.upstream.sockets_per_server),
        ("upstream.socket_max_queries", config.upstream.socket_max_queries),
        ("upstream.socket_max_age", config.upstream.socket_max_age),
        ("upstream.max_servers", config.upstream.max_servers),
        ("audit.queue_size", config.audit.queue_size),
        ("audit.drop_rate", config.audit.drop_rate),
        ("audit.drop_burst", config.audit.drop_burst),
        ("policy.reload_interval", config.policy.reload_interval),
        ("cache.max_ips_per_name", config.cache.max_ips_per_name),
        ("cache.max_names_per_endpoint", config.cache.max_names_per_endpoint),
        ("cache.max_entries", config.cache.max_entries),
        ("cache.gc_interval", config.cache.gc_interval),
        ("cache.gc_batch", config.cache.gc_batch),
        ("state.snapshot_interval", config.state.snapshot_interval),
    ]
    for where, value in positive:
        if value <= 0:
            raise ConfigError(f"{origin}: {where}: must be greater than 0, got {value}")
    if not 0 <= config.cache.ttl_headroom <= 1:
        raise ConfigError(f"{origin}: cache.ttl_headroom: must be 0..1, got "
                          f"{config.cache.ttl_headroom}")
    if config.cache.min_ttl < 0:
        raise ConfigError(f"{origin}: cache.min_ttl: must be 0 or more, got {config.cache.min_ttl}")
    if bool(config.policy.directory) != bool(config.policy.endpoints):
        raise ConfigError(f"{origin}: policy.directory and policy.endpoints go together: "
                          "policies select endpoints from the inventory")
    if config.dns.rate_limit_qps < 0 or config.dns.rate_limit_burst < 1:
        raise ConfigError(f"{origin}: dns.rate_limit_qps must be 0 or more and "
                          "dns.rate_limit_burst at least 1")
    for where, size in (("datapath.allow_max", config.datapath.allow_max),
                        ("datapath.ct_max", config.datapath.ct_max)):
        if not 1 <= size <= 1 << 26:
            raise ConfigError(f"{origin}: {where}: must be 1..{1 << 26}, got {size}")
    if config.dns.parse_cache_size < 0:
        raise ConfigError(f"{origin}: dns.parse_cache_size: must be 0 or more, got "
                          f"{config.dns.parse_cache_size}")
    if not 0 < config.dns.transparent_port < 65536:
        raise ConfigError(f"{origin}: dns.transparent_port: must be 1..65535")
    _validate_workers(config, origin)
    if config.dns.mode == "transparent" and not config.policy.directory:
        raise ConfigError(f"{origin}: dns.mode transparent needs policy.directory and "
                          "policy.endpoints: the inventory says whose DNS to redirect")
    if config.datapath.enabled and not config.policy.directory:
        raise ConfigError(f"{origin}: datapath.enabled needs policy.directory and "
                          "policy.endpoints: the datapath enforces the policies' endpoints")


# --- flags ------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section-field`` flag per option, help text and default taken from the field."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(default) if isinstance(default, tuple) else default
            unit = f" ({f.metadata['unit']})" if f.metadata.get("unit") else ""
            group.add_argument(
                f"--{section}-{f.name.replace('_', '-')}",
                dest=f"opt:{section}.{f.name}",
                metavar="VALUE",
                default=None,
                help=f"{f.metadata['help']}{unit}; default {shown!r}",
            )
    parser.add_argument(
        "--log-level", dest="opt:log_level", default=None,
        choices=LOG_LEVELS, help="agent log level; default 'info'",
    )


def from_args(args: argparse.Namespace) -> AgentConfig:
    """The configuration from ``--config FILE`` with any flags given on top of it."""
    overrides = {
        key[len("opt:"):]: value
        for key, value in vars(args).items()
        if key.startswith("opt:") and value is not None
    }
    return load(getattr(args, "config", None), overrides)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every option, for the README's configuration table."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            unit = f" ({f.metadata['unit']})" if f.metadata.get("unit") else ""
            rows.append((f"{section}.{f.name}", repr(default), f.metadata["help"] + unit))
    return rows
