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
        agent.run(agent_config)
    except agent.StartupError as error:
        print(f"fqdnproxy: could not start: {error}", file=sys.stderr)
        return ExitCode.STARTUP_FAILURE
    return ExitCode.OK


def _add_policy_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fqdnproxy policy check|explain`` (policy issue)."""


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
