"""Traffic helper run inside test namespaces: echo servers, batched probes, a held TCP session.

    peer.py serve PORT...            TCP and UDP echo on every address; prints "ready"
    peer.py probe SPEC...            SPEC = tcp|udp,ADDR,PORT[,SIZE] or icmp,ADDR; prints a JSON list of bools
    peer.py session ADDR PORT        connects, prints "connected"; each stdin line -> "ok"/"fail"
    peer.py load SERVER,NAME... QPS SPEC...
                                     a steady load until a line (or EOF) on stdin: A queries for
                                     NAMEs to SERVER:53 over UDP at QPS; for each tcp,ADDR,PORT
                                     a new connection after another; for each hold,ADDR,PORT one
                                     connection opened first and pinged every 0.1 s. Prints
                                     "started", and at the end a JSON report with monotonic
                                     times: {"sent": [[t, id]], "answered": {id: [t, rcode]},
                                     "probes": {SPEC: [[t, ok]]}}
"""

import json
import select
import socket
import sys
import threading

TIMEOUT = 1.0


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve(ports):
    socks = []
    for port in ports:
        for fam, addr in ((socket.AF_INET6, "::"),):
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            t.bind((addr, port))
            t.listen(64)
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            u.bind((addr, port))
            socks += [t, u]
    print("ready", flush=True)

    def echo(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    while True:
        readable, _, _ = select.select(socks, [], [])
        for s in readable:
            if s.type == socket.SOCK_STREAM:
                conn, _ = s.accept()
                threading.Thread(target=echo, args=(conn,), daemon=True).start()
            else:
                data, peer = s.recvfrom(65536)
                s.sendto(data, peer)


def probe(spec):
    parts = spec.split(",")
    proto, addr = parts[0], parts[1]
    if proto == "icmp":
        return ping(addr)
    port = int(parts[2])
    payload = b"x" * (int(parts[3]) if len(parts) > 3 else 32)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family(addr), kind) as s:
        s.settimeout(TIMEOUT)
        try:
            if proto == "tcp":
                s.connect((addr, port))
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                return got == payload
            s.sendto(payload, (addr, port))
            return s.recv(65536) == payload
        except OSError:
            return False


def ping(addr):
    """One ICMPv4 echo request over a raw socket (root); True on a matching reply."""
    import os
    import struct

    ident = os.getpid() & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"fqdnproxy"
    padded = body + b"\0" * (len(body) % 2)
    csum = sum(struct.unpack("!%dH" % (len(padded) // 2), padded))
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(TIMEOUT)
        s.sendto(body, (addr, 0))
        try:
            while True:
                data = s.recv(2048)
                icmp = data[(data[0] & 0x0F) * 4:]
                if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                    return True
        except OSError:
            return False


def session(addr, port):
    s = socket.create_connection((addr, int(port)), timeout=TIMEOUT)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            s.sendall(b"ping")
            ok = s.recv(16) == b"ping"
        except OSError:
            ok = False
        print("ok" if ok else "fail", flush=True)


def _query(ident, name):
    """A DNS query for ``name`` A IN with recursion desired (stdlib only)."""
    import struct

    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.strip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + b"\0\1\0\1"


def load(target, qps, specs):
    import time

    server, names = target.split(",")[0], target.split(",")[1:]
    stop = threading.Event()
    sent, answered, probes = [], {}, {spec: [] for spec in specs}
    # Unconnected: an ICMP port unreachable while no proxy listens is not an error here.
    dns = socket.socket(family(server), socket.SOCK_DGRAM)
    dns.settimeout(0.2)

    def send():
        start = time.monotonic()
        for i in range(65536):  # one id per query: answers are matched by id
            if stop.is_set():
                return
            delay = start + i / qps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent.append([time.monotonic(), i])
            try:
                dns.sendto(_query(i, names[i % len(names)]), (server, 53))
            except OSError:
                pass

    def receive(until):
        while time.monotonic() < until():
            try:
                data = dns.recv(65536)
            except OSError:
                continue
            if len(data) >= 12:
                answered.setdefault(int.from_bytes(data[:2], "big"),
                                    [time.monotonic(), data[3] & 0x0F])

    def connect(spec):
        while not stop.is_set():
            started = time.monotonic()
            probes[spec].append([started, probe(spec)])
            stop.wait(0.05)

    def hold(spec, conn):
        while not stop.is_set():
            started = time.monotonic()
            try:
                conn.sendall(b"ping")
                ok = conn.recv(16) == b"ping"
            except OSError:
                ok = False
            probes[spec].append([started, ok])
            stop.wait(0.1)

    threads = [threading.Thread(target=send)]
    stopped = []
    threads.append(threading.Thread(
        target=receive, args=(lambda: stopped[0] + 1.0 if stopped else float("inf"),)))
    for spec in specs:
        kind, addr, port = spec.split(",")
        if kind == "hold":
            conn = socket.create_connection((addr, int(port)), timeout=TIMEOUT)
            threads.append(threading.Thread(target=hold, args=(spec, conn)))
        else:
            threads.append(threading.Thread(target=connect, args=(spec,)))
    for thread in threads:
        thread.start()
    print("started", flush=True)
    sys.stdin.readline()
    stopped.append(time.monotonic())  # late answers are taken for 1 s more
    stop.set()
    for thread in threads:
        thread.join()
    print(json.dumps({"sent": sent, "answered": answered, "probes": probes}), flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve([int(p) for p in args])
    elif mode == "probe":
        print(json.dumps([probe(spec) for spec in args]), flush=True)
    elif mode == "loop":  # loop SECONDS SPEC...: probe until SECONDS pass, JSON {spec: [bools]}
        import time

        TIMEOUT = 0.3
        deadline = time.monotonic() + float(args[0])
        results = {spec: [] for spec in args[1:]}
        print("started", flush=True)
        while time.monotonic() < deadline:
            for spec in args[1:]:
                results[spec].append(probe(spec))
        print(json.dumps(results), flush=True)
    elif mode == "session":
        session(*args)
    elif mode == "load":
        load(args[0], float(args[1]), args[2:])
