"""Named network namespaces for the lab: create, list by prefix, run in, open sockets in, remove.

Named namespaces live as bind mounts under /run/netns (what ``ip netns`` uses), so a lab left by
a crashed process is still found by its name prefix. Nothing here touches the namespace the
caller runs in, except ``socket_in``, which moves one thread out and back for one ``socket()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

from pyroute2 import NetNS
from pyroute2 import netns as pr_netns

from fqdnproxy.errors import FqdnproxyError

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000


class NetnsError(FqdnproxyError):
    """A network namespace operation failed."""


def exists(name: str) -> bool:
    """Report whether the named namespace exists."""
    return os.path.exists(os.path.join(NETNS_DIR, name))


def names(prefix: str) -> list[str]:
    """The named namespaces whose name starts with ``prefix``, sorted."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace with ``lo`` up, IPv6 DAD off (addresses usable at once) and
    no router solicitations (nothing answers them; the lab's routes are static).

    Raises:
        NetnsError: it exists already.
    """
    if exists(name):
        raise NetnsError(f"network namespace {name} exists already")
    pr_netns.create(name)
    # Before any interface exists, so every later one inherits "default".
    run(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.router_solicitations=0",
        "net.ipv6.conf.default.router_solicitations=0")
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> bool:
    """Delete the named namespace (and every interface in it); True if it existed."""
    if not exists(name):
        return False
    pr_netns.remove(name)
    return True


def pids(name: str) -> list[int]:
    """Processes whose network namespace is the named one (as ``ip netns pids``)."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry))
    return sorted(found)


def run(name: str, *argv: str, timeout: float = 30,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside the named namespace (``ip netns exec``), capturing its output.

    Raises:
        subprocess.CalledProcessError: with ``check``, a non-zero exit.
    """
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True,
                          timeout=timeout, check=check)


def terminate(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM ``pid``, SIGKILL it if still there after ``timeout``; True if it was running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _alive(pid) and time.monotonic() < deadline + 5.0:
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """Running (a zombie child of ours is reaped here and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def socket_in(name: str, family: int, kind: int) -> Iterator[socket.socket]:
    """A socket made in the named namespace; it stays there for its whole life.

    Raises:
        NetnsError: the namespace is missing, or the thread could not return home.
    """
    sock = make_socket(name, family, kind)
    with sock:
        yield sock


def make_socket(name: str, family: int, kind: int) -> socket.socket:
    """Open a socket in the named namespace (the caller closes it).

    Raises:
        NetnsError: the namespace is missing, or the thread could not return home.
    """
    # setns() moves only the calling thread; a socket keeps the namespace it was made in.
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = open(os.path.join(NETNS_DIR, name), "rb")
    except FileNotFoundError:
        raise NetnsError(f"no network namespace {name}") from None
    with open("/proc/thread-self/ns/net", "rb") as home, target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}): {os.strerror(err)}")
        try:
            return socket.socket(family, kind)
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"cannot return to the original namespace: {os.strerror(err)}")
