"""The world's TCP and UDP echo servers: ``python -m fqdnproxy.lab.servers --ports 80,443 IP...``.

Run inside the world namespace. TCP listens on the wildcard address (an accepted connection
answers from the address it was made to); UDP binds one socket per address and port, so every
reply leaves from the address the datagram was sent to and a pod's connected socket accepts it.
Prints ``ready`` once every socket is bound; echoes until killed.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import threading

DEFAULT_PORTS = (80, 443, 853)  # HTTP, HTTPS, DNS-over-TLS (bypass attempts meet a server)


def bind_all(ips: list[str], ports: list[int]) -> list[socket.socket]:
    """Bound sockets: one dual-stack TCP listener per port, one UDP socket per address and port."""
    sockets = []
    for port in ports:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", port))
        listener.listen(128)
        sockets.append(listener)
        for ip in ips:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            datagram = socket.socket(family, socket.SOCK_DGRAM)
            datagram.bind((ip, port))
            sockets.append(datagram)
    return sockets


def _echo_stream(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def serve(sockets: list[socket.socket]) -> None:
    """Echo on every socket until killed."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock.type == socket.SOCK_STREAM:
                conn, _ = sock.accept()
                threading.Thread(target=_echo_stream, args=(conn,), daemon=True).start()
            else:
                try:
                    data, peer = sock.recvfrom(65536)
                    sock.sendto(data, peer)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqdnproxy.lab.servers", description=__doc__)
    parser.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)),
                        help="comma-separated ports (TCP and UDP)")
    parser.add_argument("ips", nargs="+", metavar="IP", help="addresses UDP answers on")
    args = parser.parse_args(argv)
    sockets = bind_all(args.ips, [int(p) for p in args.ports.split(",") if p])
    print("ready", flush=True)
    serve(sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
