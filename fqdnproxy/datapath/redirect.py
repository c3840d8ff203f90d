"""Transparent DNS redirection: nftables TPROXY hands pods' DNS to the proxy's local sockets.

In the agent's network namespace (DESIGN.md step 2):

    table inet fqdnproxy                      (owned by fqdnproxy, replaced atomically)
      chain prerouting (hook prerouting, priority mangle)
        iifname { pod veths } udp/tcp dport 53  -> mark 0x1d53, tproxy to 127.0.0.1:PORT
        iifname { pod veths } udp/tcp dport 53  -> mark 0x1d53, tproxy to [::1]:PORT    (IPv6)
    ip rule fwmark 0x1d53 lookup 153;  table 153: local 0.0.0.0/0 dev lo   (and the same for -6)

The packet keeps its original destination; the proxy's transparent socket reads it and answers
from that address, so ``dig @10.96.0.10`` sees 10.96.0.10 answer. Every query to any server on
port 53 from a redirected interface goes through the proxy (DoT on 853 is the datapath's to drop).

The table is written in one nftables transaction (create-then-delete-then-define), so there is
never a moment without redirection on a reload. ``remove`` deletes the table, the rules and the
routes; everything is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from fqdnproxy.errors import FqdnproxyError

TABLE = "fqdnproxy"
MARK = 0x1D53
ROUTE_TABLE = 153
RULE_PRIORITY = 1530


class RedirectError(FqdnproxyError):
    """The redirection rules could not be installed."""


@dataclass(frozen=True)
class Redirect:
    """Which interfaces' DNS goes to which local port."""

    interfaces: tuple[str, ...]
    port: int
    dns_port: int = 53

    def ruleset(self) -> str:
        """The nftables script that replaces the whole table atomically."""
        lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}",
                 f"table inet {TABLE} {{", "  chain prerouting {",
                 "    type filter hook prerouting priority mangle; policy accept;"]
        if self.interfaces:
            names = ", ".join(json.dumps(name) for name in sorted(self.interfaces))
            match = (f"iifname {{ {names} }} meta l4proto {{ udp, tcp }} "
                     f"th dport {self.dns_port}")
            lines += [
                f"    {match} meta nfproto ipv4 meta mark set {MARK:#x} "
                f"tproxy ip to 127.0.0.1:{self.port} accept",
                f"    {match} meta nfproto ipv6 meta mark set {MARK:#x} "
                f"tproxy ip6 to [::1]:{self.port} accept",
            ]
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"


def _nft(script: str) -> str:
    import nftables  # Debian's python3-nftables (libnftables)

    nft = nftables.Nftables()
    rc, output, error = nft.cmd(script)
    if rc != 0:
        raise RedirectError(f"nftables refused the rules: {error.strip()}")
    return str(output)


def install(redirect: Redirect) -> None:
    """Install or replace the table, the fwmark rules and the local routes (idempotent).

    Raises:
        RedirectError: nftables or netlink refused.
    """
    _routes(add=True)
    _nft(redirect.ruleset())


def remove() -> None:
    """Remove the table, rules and routes; nothing happens for what is already gone."""
    _nft(f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
    _routes(add=False)


def installed() -> str | None:
    """The table as nftables lists it, or None."""
    try:
        return _nft(f"list table inet {TABLE}")
    except RedirectError:
        return None


def _routes(add: bool) -> None:
    """fwmark -> table ROUTE_TABLE, whose default route is local (both families)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for family, dst in ((2, "0.0.0.0/0"), (10, "::/0")):
            rules = [r for r in ipr.get_rules(family=family)
                     if r.get_attr("FRA_FWMARK") == MARK and r.get_attr("FRA_TABLE") == ROUTE_TABLE]
            try:
                if add and not rules:
                    ipr.rule("add", family=family, fwmark=MARK, table=ROUTE_TABLE,
                             priority=RULE_PRIORITY)
                if not add:
                    for _ in rules:
                        ipr.rule("del", family=family, fwmark=MARK, table=ROUTE_TABLE,
                                 priority=RULE_PRIORITY)
                _local_route(ipr, family, dst, add)
            except NetlinkError as error:
                raise RedirectError(f"policy routing for TPROXY: {error}") from None


def _local_route(ipr: object, family: int, dst: str, add: bool) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    lo = ipr.link_lookup(ifname="lo")[0]  # type: ignore[attr-defined]
    # A local route is host-scoped (what `ip route add local ...` sets; IPv4 insists).
    scope = {"scope": 254} if family == 2 else {}
    try:
        ipr.route("replace" if add else "del", family=family, dst=dst,  # type: ignore[attr-defined]
                  type="local", oif=lo, table=ROUTE_TABLE, **scope)
    except NetlinkError as error:
        if add or error.code not in (3, 2):  # ESRCH / ENOENT: already gone
            raise


def interfaces_of(names: Sequence[str]) -> tuple[str, ...]:
    """The interface names to redirect, deduplicated and ordered."""
    return tuple(sorted(set(names)))
