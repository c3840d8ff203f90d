"""The command line: ``fqdnproxy run``, ``fqdnproxy policy ...`` and friends.

Only this module maps errors to exit codes (see ``ExitCode``); libraries raise.
"""

from __future__ import annotations

import argparse
import sys
from enum import IntEnum
from typing import Callable, Sequence

from fqdnproxy import __version__
from fqdnproxy.errors import FqdnproxyError


class ExitCode(IntEnum):
    OK = 0
    PROBLEMS_FOUND = 1  # a check command found problems (policy check)
    USAGE = 2  # invalid command line or configuration
    STARTUP_FAILURE = 3  # the agent could not start (ports taken, kernel refused, ...)


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each subcommand stores its handler in ``args.handler``."""
    parser = argparse.ArgumentParser(
        prog="fqdnproxy",
        description="DNS-aware L7 proxy and FQDN firewall for Linux workloads.",
    )
    parser.add_argument("--version", action="version", version=f"fqdnproxy {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_run_command(commands)
    _add_policy_commands(commands)
    _add_map_commands(commands)
    _add_cache_commands(commands)
    _add_status_command(commands)
    _add_endpoint_commands(commands)
    _add_lab_commands(commands)
    return parser


def _add_run_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy run``: start the agent (see agent.py)."""
    from fqdnproxy import config

    run = commands.add_parser("run", help="run the agent (DNS proxy and datapath)")
    run.add_argument("--config", metavar="FILE", help="YAML configuration file")
    config.add_flags(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from fqdnproxy import agent, config

    try:
        agent_config = config.from_args(args)
    except config.ConfigError as error:
        print(f"fqdnproxy: invalid configuration: {error}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        # The same command line starts the agent's DNS workers (dns.workers; workers.py).
        agent.run(agent_config, [sys.executable, "-m", "fqdnproxy", *sys.argv[1:]])
    except agent.StartupError as error:
        print(f"fqdnproxy: could not start: {error}", file=sys.stderr)
        return ExitCode.STARTUP_FAILURE
    return ExitCode.OK


def _add_policy_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy policy check|explain`` (policy issue)."""
    policy = commands.add_parser("policy", help="check policies, explain a verdict")
    verbs = policy.add_subparsers(title="policy commands", metavar="VERB")
    policy.set_defaults(handler=lambda _args: policy.print_help() or ExitCode.USAGE)

    check = verbs.add_parser("check", help="validate policy files; every problem is listed")
    check.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories")
    check.add_argument("--endpoints", metavar="FILE", help="also validate this endpoint inventory")
    check.add_argument("--output", choices=("table", "json"), default="table")
    check.set_defaults(handler=_policy_check)

    explain = verbs.add_parser("explain", help="the verdict on one query of one endpoint, and why")
    explain.add_argument("--policies", required=True, metavar="DIR", action="append",
                         help="policy directory or file (repeatable)")
    explain.add_argument("--endpoints", required=True, metavar="FILE", help="endpoint inventory")
    explain.add_argument("--endpoint", required=True, metavar="NS/NAME", help="the querying endpoint")
    explain.add_argument("--query", required=True, metavar="NAME", help="the DNS name asked")
    explain.add_argument("--server", metavar="IP:PORT",
                         help="the DNS server asked (default: the inventory's kube-dns, port 53)")
    explain.add_argument("--protocol", choices=("udp", "tcp"), default="udp")
    explain.add_argument("--output", choices=("table", "json"), default="table")
    explain.set_defaults(handler=_policy_explain)
    _add_policy_list(verbs)


def _policy_check(args: argparse.Namespace) -> int:
    from fqdnproxy.policy import commands

    result = commands.check(args.paths, args.endpoints)
    print(commands.render_check(result, args.output))
    return ExitCode.OK if result.ok else ExitCode.PROBLEMS_FOUND


def _policy_explain(args: argparse.Namespace) -> int:
    """Prints the verdict; exits 0 whether the query is allowed or denied (read ``verdict``)."""
    from fqdnproxy.policy import commands

    result = commands.explain(args.policies, args.endpoints, args.endpoint, args.query,
                              args.server, args.protocol)
    print(commands.render_explain(result, args.output))
    return ExitCode.OK


def _add_admin_options(parser: argparse.ArgumentParser) -> None:
    from fqdnproxy import admin

    parser.add_argument("--socket", default=admin.DEFAULT_SOCKET,
                        help=f"the agent's admin socket (default {admin.DEFAULT_SOCKET})")
    parser.add_argument("--output", choices=("table", "json"), default="table")


def _add_cache_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy cache list``: what the running agent learned, per endpoint and name."""
    cache = commands.add_parser("cache", help="the running agent's FQDN cache")
    verbs = cache.add_subparsers(title="cache commands", metavar="VERB")
    listing = verbs.add_parser("list", help="learned names and IPs, per endpoint")
    listing.add_argument("--endpoint", metavar="NS/NAME", help="only this endpoint")
    listing.add_argument("--name", help="only this DNS name")
    _add_admin_options(listing)
    listing.set_defaults(handler=_cache_list)
    clean = verbs.add_parser("clean", help="forget what an endpoint or a name taught, and remove "
                                           "its allow-map entries")
    clean.add_argument("--endpoint", metavar="NS/NAME", help="this endpoint (or its numeric id)")
    clean.add_argument("--name", help="this DNS name (of every endpoint, or of --endpoint)")
    _add_admin_options(clean)
    clean.set_defaults(handler=_cache_clean)


def _cache_list(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fqdnproxy.admin import client, render

    try:
        rows = client.call(Path(args.socket), "cache.list",
                           {"endpoint": args.endpoint, "name": args.name})
    except client.AdminError as error:
        print(f"fqdnproxy: {error}", file=sys.stderr)
        return ExitCode.PROBLEMS_FOUND
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(render.table(
            ("ENDPOINT", "NAME", "TTL", "EXPIRES", "SOURCE", "IPS"),
            [(r["endpoint"], r["name"], f"{r['ttl']}s", r["expires"], r["source"],
              ", ".join(r["ips"])) for r in rows]))
    return ExitCode.OK


def _ask(args: argparse.Namespace, command: str, params: dict[str, object],
         table: Callable[[object], str]) -> int:
    """Send ``command`` to the agent at ``args.socket``; print its result as JSON or ``table``."""
    import json
    from pathlib import Path

    from fqdnproxy.admin import client

    try:
        result = client.call(Path(args.socket), command, params)
    except client.AdminError as error:
        print(f"fqdnproxy: {error}", file=sys.stderr)
        return ExitCode.PROBLEMS_FOUND
    print(json.dumps(result, indent=2) if args.output == "json" else table(result))
    return ExitCode.OK


def _add_status_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy status``: the running agent at a glance."""
    from fqdnproxy.admin import render

    status = commands.add_parser("status", help="the running agent: uptime, readiness, "
                                                "endpoints, policies, cache and map sizes, reload")
    _add_admin_options(status)
    status.set_defaults(handler=lambda args: _ask(args, "status", {}, render.status))


def _add_endpoint_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy endpoint list``: the running agent's inventory and each endpoint's mode."""
    from fqdnproxy.admin import render

    endpoint = commands.add_parser("endpoint", help="the running agent's endpoints")
    verbs = endpoint.add_subparsers(title="endpoint commands", metavar="VERB")
    endpoint.set_defaults(handler=lambda _args: endpoint.print_help() or ExitCode.USAGE)
    listing = verbs.add_parser("list", help="endpoints: addresses, mode, policies, cached names, "
                                            "datapath packets")
    _add_admin_options(listing)
    listing.set_defaults(handler=lambda args: _ask(args, "endpoint.list", {}, render.endpoints))


def _add_policy_list(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy policy list``: what the running agent loaded, from which files."""
    from fqdnproxy.admin import render

    listing = verbs.add_parser("list", help="the running agent's policies, their files and "
                                            "the endpoints they select")
    _add_admin_options(listing)
    listing.set_defaults(handler=lambda args: _ask(args, "policy.list", {}, render.policies))


def _cache_clean(args: argparse.Namespace) -> int:
    from fqdnproxy.admin import render

    if not args.endpoint and not args.name:
        print("fqdnproxy: cache clean needs --endpoint, --name or both", file=sys.stderr)
        return ExitCode.USAGE
    return _ask(args, "cache.clean", {"endpoint": args.endpoint, "name": args.name},
                render.cache_clean)


def _add_map_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy map dump`` (datapath issue): read the pinned maps, no program needed."""
    maps_parser = commands.add_parser("map", help="inspect the datapath's pinned maps")
    verbs = maps_parser.add_subparsers(title="map commands", metavar="VERB")
    maps_parser.set_defaults(handler=lambda _args: maps_parser.print_help() or ExitCode.USAGE)
    dump = verbs.add_parser("dump", help="print the allow entries (endpoint, prefix, ports, expiry)")
    dump.add_argument("--pin-dir", default="/sys/fs/bpf/fqdnproxy", metavar="DIR",
                      help="read the maps pinned here (no agent needed)")
    dump.add_argument("--socket", metavar="PATH",
                      help="ask the running agent instead (adds endpoint names)")
    dump.add_argument("--output", choices=("table", "json"), default="table")
    dump.set_defaults(handler=_map_dump)


def _map_dump(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fqdnproxy.datapath import allowmap, dump, pinned

    if args.socket:
        return _ask(args, "map.dump", {}, lambda rows: dump.render_rows(rows, "table"))
    entries = pinned.dump_every_worker(Path(args.pin_dir))  # every DNS worker's entries
    print(dump.render(entries, allowmap.kernel_now_ns(), args.output))
    return ExitCode.OK


def _add_lab_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy lab up|down|status``: the network-namespace sandbox (fqdnproxy/lab/)."""
    from pathlib import Path

    lab_parser = commands.add_parser("lab", help="the network-namespace lab: pods, node, world")
    verbs = lab_parser.add_subparsers(title="lab commands", metavar="VERB")
    lab_parser.set_defaults(handler=lambda _args: lab_parser.print_help() or ExitCode.USAGE)
    state = {"default": Path("/run/fqdnproxy-lab"), "type": Path, "metavar": "DIR",
             "help": "where the lab records its processes, logs and bpffs"}

    up = verbs.add_parser("up", help="build the lab and start knot, echo servers and the agent")
    up.add_argument("--inventory", type=Path, metavar="FILE",
                    help="endpoint inventory: one pod namespace per workload "
                         "(default policies/endpoints.demo.yaml)")
    up.add_argument("--policies", type=Path, metavar="PATH",
                    help="the agent's policies (default policies/demo.yaml)")
    up.add_argument("--dns-mode", choices=("transparent", "explicit"),
                    help="how pods' DNS reaches the proxy (default: transparent when available)")
    up.add_argument("--cache-min-ttl", type=int, default=2, metavar="SECONDS",
                    help="the agent's cache.min_ttl (default 2: short TTLs show in the lab)")
    up.add_argument("--state-dir", **state)
    up.set_defaults(handler=_lab_up)

    down = verbs.add_parser("down", help="remove everything the lab made (also after a crash)")
    down.add_argument("--state-dir", **state)
    down.set_defaults(handler=_lab_down)

    status = verbs.add_parser("status", help="what of the lab exists; exit 1 unless it is all up")
    status.add_argument("--state-dir", **state)
    status.set_defaults(handler=_lab_status)


def _lab_up(args: argparse.Namespace) -> int:
    import dataclasses

    from fqdnproxy.lab import lab

    settings = lab.LabSettings(state_dir=args.state_dir, min_ttl=args.cache_min_ttl)
    for name in ("inventory", "policies", "dns_mode"):
        if getattr(args, name) is not None:
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    try:
        lab.up(settings)
    except FqdnproxyError as error:
        print(f"fqdnproxy: lab up failed (everything it made is removed): {error}",
              file=sys.stderr)
        return ExitCode.STARTUP_FAILURE
    print("\n".join(lab.status(args.state_dir).lines))
    return ExitCode.OK


def _lab_down(args: argparse.Namespace) -> int:
    from fqdnproxy.lab import lab

    if not lab.down(args.state_dir):
        print("lab: nothing to remove")
    return ExitCode.OK


def _lab_status(args: argparse.Namespace) -> int:
    from fqdnproxy.lab import lab

    result = lab.status(args.state_dir)
    print("\n".join(result.lines))
    return ExitCode.OK if result.up else ExitCode.PROBLEMS_FOUND


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fqdnproxy`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return ExitCode.USAGE
    try:
        return handler(args)
    except FqdnproxyError as error:
        print(f"fqdnproxy: {error}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.OK
