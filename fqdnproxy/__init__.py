"""fqdnproxy: a DNS-aware L7 proxy and FQDN firewall for Linux workloads.

See DESIGN.md for the path of one query; ``agent.py`` draws it at its top.
"""

__version__ = "0.1.0"
