"""The eBPF datapath: bpf/fqdn_egress.c and the Python that loads, attaches and drives it.

``egress.EgressDatapath`` (bcc; root), ``pinned.PinnedMaps`` (pinned maps, libbpf), ``maps``
(codecs mirroring the C structs), ``allowmap`` (the proxy-side ``AllowMapWriter`` Protocol and
its in-memory form; no bcc). See README.md in this directory.
"""
