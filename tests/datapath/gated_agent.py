"""``fqdnproxy run`` whose background compile, after a restart over existing pins, waits for a
gate file: the real agent, maps and program, only the moment the compile starts is the test's.

    python -m tests.datapath.gated_agent GATE [fqdnproxy run options...]

Logs "compile gate: waiting for GATE" and starts the compile once the file GATE exists, so the
test can look at DNS and the datapath while the previous agent's program is still the one
attached (``Agent.program_gate``). Exit statuses as ``fqdnproxy run``'s.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from fqdnproxy import agent, cli, config

POLL = 0.05  # s; only the start of the compile waits on this


def main() -> int:
    gate, *argv = sys.argv[1:]
    cfg = config.from_args(cli.build_parser().parse_args(["run", *argv]))
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def wait() -> None:
        logging.getLogger("fqdnproxy").info("compile gate: waiting for %s", gate)
        while not Path(gate).exists():
            await asyncio.sleep(POLL)

    try:
        uvloop.run(agent.Agent(cfg, program_gate=wait).serve())
    except agent.StartupError as error:
        print(f"fqdnproxy: could not start: {error}", file=sys.stderr)
        return cli.ExitCode.STARTUP_FAILURE
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
