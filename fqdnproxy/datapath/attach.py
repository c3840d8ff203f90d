"""Attach and detach the egress program on clsact ingress, with pyroute2, idempotently.

The filter is identified by a fixed (priority, handle), so attaching again *replaces* the
program in one netlink request (``tc filter replace``): the kernel swaps the program pointer and
no packet sees the interface unfiltered. Other filters on the interface, and the clsact qdisc
itself, are left alone on detach.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from fqdnproxy.errors import FqdnproxyError

TC_H_CLSACT_INGRESS = "ffff:fff2"  # clsact's ingress hook: the endpoint's egress on a host veth
FILTER_PRIO = 0xF0D  # ours alone; other filters keep their own priorities
FILTER_HANDLE = 0xF0D
ETH_P_ALL = 0x0003


class AttachError(FqdnproxyError):
    """The program could not be attached to or detached from an interface."""


class NoInterface(AttachError):
    """No such interface (here, or in that network namespace)."""


@contextlib.contextmanager
def _netlink(netns: str | None) -> Iterator[IPRoute]:
    ipr = NetNS(netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, interface: str | int) -> int:
    if isinstance(interface, int):
        return interface
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise NoInterface(f"no interface {interface!r}")
    return int(found[0])


def attach(prog_fd: int, prog_name: str, interface: str | int, netns: str | None = None) -> int:
    """Attach (or atomically replace) the program on ``interface``'s clsact ingress.

    Adds the clsact qdisc when missing. Returns the interface index.

    Raises:
        NoInterface: no such interface.
        AttachError: the kernel refused.
    """
    with _netlink(netns) as ipr:
        index = _index(ipr, interface)
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise AttachError(f"cannot add clsact to {interface}: {exc}") from exc
        try:
            ipr.tc(
                "replace-filter", "bpf", index, FILTER_HANDLE,
                fd=prog_fd, name=prog_name, parent=TC_H_CLSACT_INGRESS,
                prio=FILTER_PRIO, protocol=ETH_P_ALL, direct_action=True,
            )
        except NetlinkError as exc:
            raise AttachError(f"cannot attach to {interface}: {exc}") from exc
        return index


def detach(interface: str | int, netns: str | None = None) -> bool:
    """Remove our filter from ``interface``; return False when it was not there."""
    with _netlink(netns) as ipr:
        try:
            index = _index(ipr, interface)
        except AttachError:
            return False
        try:
            ipr.tc("del-filter", "bpf", index, FILTER_HANDLE, parent=TC_H_CLSACT_INGRESS,
                   prio=FILTER_PRIO, protocol=ETH_P_ALL)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL):  # no clsact, or no such filter
                return False
            raise AttachError(f"cannot detach from {interface}: {exc}") from exc
        return True


def attached(interface: str | int, netns: str | None = None) -> list[dict[str, object]]:
    """The bpf filters on ``interface``'s clsact ingress: prio, handle, program name and id."""
    out = []
    with _netlink(netns) as ipr:
        index = _index(ipr, interface)
        try:
            filters = ipr.get_filters(index=index, parent=TC_H_CLSACT_INGRESS)
        except NetlinkError:
            return []
        for f in filters:
            if f.get_attr("TCA_KIND") != "bpf":
                continue
            opts = f.get_attr("TCA_OPTIONS")
            if opts is None:
                continue
            out.append({
                "prio": f["info"] >> 16,
                "handle": f["handle"],
                "name": opts.get_attr("TCA_BPF_NAME"),
                "id": opts.get_attr("TCA_BPF_ID"),
            })
    return out
