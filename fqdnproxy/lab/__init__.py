"""The network-namespace lab behind ``make demo`` and the tier-4 tests.

    lab.py        up / down / status: builds, records and removes a lab (``fqdnproxy lab``)
    topology.py   namespaces, veths, addresses and routes from an endpoint inventory
    knot.py       the world's real DNS server (knotd serving zones/demo.test.zone)
    servers.py    the world's TCP and UDP echo servers
    processes.py  detached processes in a namespace, ready when they say so
    netns.py      named network namespaces: create, list by prefix, remove, sockets inside
    client.py     what a pod does: dig, connect, hold a connection open
    scenario.py   the demo's script, over IPv4 or IPv6
    demo.py       ``make demo``: lab up, scenario, table and audit records, lab down
    agent_process.py  ``fqdnproxy run`` as a child process (loopback tests, benchmarks)
"""
