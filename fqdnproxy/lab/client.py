"""What a pod does in the scenario: look names up with dig, connect, hold a connection open.

Lookups run the real ``dig`` inside the pod's namespace, as a user would. Connections are made
from this process with sockets opened in the pod's namespace (netns.make_socket), so an
established connection can be held open across steps and used again later. A connection that
the datapath drops shows as a timeout: the tc program drops silently.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass

from fqdnproxy.lab import netns

CONNECT_TIMEOUT = 1.0  # seconds: the lab's links answer in well under a millisecond
PAYLOAD = b"fqdnproxy lab\n"


@dataclass(frozen=True)
class Lookup:
    """A dig result: the status (NOERROR, REFUSED, ..., TIMEOUT) and the answer records."""

    status: str
    records: tuple[tuple[str, str, int, str], ...]  # (owner, type, ttl, data)

    def data(self, rtype: str) -> list[str]:
        """The answer data of type ``rtype``."""
        return [data for _, kind, _, data in self.records if kind == rtype]

    def ttl(self, rtype: str) -> int | None:
        """The smallest TTL among the records of type ``rtype``."""
        ttls = [ttl for _, kind, ttl, _ in self.records if kind == rtype]
        return min(ttls) if ttls else None


def dig_command(namespace: str, name: str, qtype: str, server: str | None = None,
                tcp: bool = False) -> list[str]:
    """The ``ip netns exec NS dig ...`` command line."""
    argv = ["ip", "netns", "exec", namespace, "dig", "+tries=1", "+time=2"]
    if tcp:
        argv.append("+tcp")
    if server:
        argv.append(f"@{server}")
    return [*argv, name, qtype]


def dig(namespace: str, name: str, qtype: str, server: str | None = None,
        tcp: bool = False) -> Lookup:
    """Look ``name`` up from inside ``namespace`` (resolv.conf's server unless ``server``)."""
    argv = dig_command(namespace, name, qtype, server, tcp)
    argv[7:7] = ["+noall", "+comments", "+answer"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout
    status = next((line.split("status: ")[1].split(",")[0]
                   for line in out.splitlines() if "status: " in line), "TIMEOUT")
    records = []
    for line in out.splitlines():
        fields = line.split()
        if line.startswith(";") or len(fields) < 5 or fields[2] != "IN":
            continue
        records.append((fields[0], fields[3], int(fields[1]), fields[4]))
    return Lookup(status, tuple(records))


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def connect(namespace: str, ip: str, port: int) -> tuple[bool, int]:
    """A new TCP connection from ``namespace`` that echoes one message: (worked, source port)."""
    with Session.open(namespace, ip, port) as session:
        return session.connected and session.exchange(), session.port


def udp(namespace: str, ip: str, port: int) -> bool:
    """One UDP datagram to an echo server and its reply; False if either was lost."""
    with netns.socket_in(namespace, _family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((ip, port))
            sock.send(PAYLOAD)
            return sock.recv(len(PAYLOAD) + 1) == PAYLOAD
        except OSError:
            return False


@dataclass
class Session:
    """One TCP connection from a pod, kept open between steps."""

    sock: socket.socket
    connected: bool

    @classmethod
    def open(cls, namespace: str, ip: str, port: int) -> Session:
        """Connect from ``namespace``; ``connected`` says whether the handshake finished."""
        sock = netns.make_socket(namespace, _family(ip), socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        sock.bind(("::" if ":" in ip else "0.0.0.0", 0))  # the source port is known at once
        try:
            sock.connect((ip, port))
        except OSError:
            return cls(sock, False)
        return cls(sock, True)

    @property
    def port(self) -> int:
        """The connection's source port (audit drop records carry it)."""
        return int(self.sock.getsockname()[1])

    def exchange(self) -> bool:
        """Send a message and read the echo; False on a timeout or error."""
        if not self.connected:
            return False
        try:
            self.sock.sendall(PAYLOAD)
            got = b""
            while len(got) < len(PAYLOAD):
                chunk = self.sock.recv(len(PAYLOAD) - len(got))
                if not chunk:
                    return False
                got += chunk
        except OSError:
            return False
        return got == PAYLOAD

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
