"""A stand-in agent for the restart test: load, attach, print "attached", wait to be killed.

    loader.py PIN_DIR BPFFS NETNS IFNAME...
"""

import sys
from pathlib import Path

from fqdnproxy.datapath import egress

pin_dir, bpffs, netns, *ifnames = sys.argv[1:]
dp = egress.EgressDatapath.load(Path(pin_dir), egress.Options(), bpffs=Path(bpffs))
for ifname in ifnames:
    dp.attach(ifname, netns=netns)
print("attached", flush=True)
sys.stdin.read()  # until killed (or stdin closes)
