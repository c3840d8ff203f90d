"""IP addresses as integer keys: how the FQDN cache and the learn stage hold them.

A million learned IPs are a million keys in the cache's indexes. As text an IPv4 address is a
58-byte string; as an integer it is 28 to 32 bytes, hashes without reading characters, and is
what the static rules' prefix tables (``statics.py``) and the kernel key packing need anyway.

A key is the address's value for IPv4 and the address's value plus ``V6`` (2**128) for IPv6, so
``192.0.2.1`` and ``::c000:201`` never share a key. Text goes in and out at the cache's public
boundary only; every spelling of an address maps to one key, and keys come back out in the
spelling ``wire.parse_response`` uses (RFC 5952, as ``ipaddress`` writes it).
"""

from __future__ import annotations

import ipaddress
import socket

V6 = 1 << 128


def key(ip: str) -> int:
    """The key of an IP address in text.

    Raises:
        ValueError: ``ip`` is not an IPv4 or IPv6 address.
    """
    try:
        if ":" in ip:
            return int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big") | V6
        return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError as error:  # inet_pton: "illegal IP address string passed to inet_pton"
        raise ValueError(f"{ip!r} is not an IP address") from error


def text(ip_key: int) -> str:
    """The address of ``ip_key`` in text."""
    if ip_key < V6:
        return socket.inet_ntop(socket.AF_INET, ip_key.to_bytes(4, "big"))
    packed = (ip_key - V6).to_bytes(16, "big")
    spelled = socket.inet_ntop(socket.AF_INET6, packed)
    # inet_ntop writes IPv4-mapped and -compatible addresses with a dotted tail; ipaddress (and
    # so wire.parse_response) does not.
    return spelled if "." not in spelled else str(ipaddress.IPv6Address(packed))


def split(ip_key: int) -> tuple[int, int]:
    """(family, the address's integer value) of a key: (4, value) or (6, value)."""
    return (4, ip_key) if ip_key < V6 else (6, ip_key - V6)
