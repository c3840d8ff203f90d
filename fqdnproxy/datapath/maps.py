"""Codecs for the maps of ``bpf/fqdn_egress.c``: ctypes mirrors of its structs, and conversions.

Every structure here copies one in the C file, field for field, pad for pad. ``layout_cflags()``
turns them into -D flags that make the C compiler assert the same sizes and offsets, so a drift
fails the load instead of misreading a map. Bump ``LAYOUT_VERSION`` with the C's
FQDN_LAYOUT_VERSION whenever a pinned map changes.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress

from fqdnproxy.datapath.allowmap import MAX_PORT_RANGES, AllowEntry, AllowKey, Address, PortRange

LAYOUT_VERSION = 2  # FQDN_LAYOUT_VERSION (2: counters slots and array, hashed ct key)

# The pinned maps (file names under the pin directory), in the order the C declares them.
PINNED_MAPS = (
    "meta", "endpoints", "ifaces", "allow", "allow_exact", "ct", "counters", "slots", "dns_targets",
)

# DNS workers (dns.workers) past the first each write an exact allow map of their own, made when
# the program is compiled for that many workers (FQDN_WORKERS); worker 0's is ``allow_exact``.
MAX_WORKERS = 8


def exact_map(worker: int) -> str:
    """The pinned name of DNS worker ``worker``'s exact allow map."""
    if not 0 <= worker < MAX_WORKERS:
        raise ValueError(f"worker {worker} is not 0 to {MAX_WORKERS - 1}")
    return "allow_exact" if worker == 0 else f"allow_exact_{worker}"


WORKER_EXACT_MAPS = tuple(exact_map(worker) for worker in range(1, MAX_WORKERS))

V4_MAPPED = b"\x00" * 10 + b"\xff\xff"  # the prefix of an IPv4 address in the maps


class EndpointFlags(enum.IntFlag):
    """enum fqdn_endpoint_flags."""

    NONE = 0
    ENFORCE_EGRESS = 1 << 0  # some policy selects the endpoint for egress
    AUDIT = 1 << 1  # log would-be drops and pass them


class Reason(enum.IntEnum):
    """enum fqdn_reason: why a packet passed or was dropped (counter and event key)."""

    PASS_UNENFORCED = 0  # the endpoint has no egress policy
    PASS_DNS = 1  # DNS to the proxy
    PASS_ESTABLISHED = 2  # a recorded flow, not idle
    PASS_ALLOWED = 3  # a new flow with an allow hit (now recorded)
    PASS_ICMP_CONTROL = 4  # ICMP errors, echo replies, NDP, MLD
    AUDITED = 5  # would have been dropped; the endpoint has AUDIT
    DROP_NO_ENTRY = 6  # no allow entry covers the destination
    DROP_EXPIRED = 7  # the covering entry has expired
    DROP_PORT = 8  # an entry covers the address but not the port or protocol
    DROP_SPOOFED = 9  # an endpoint's source on another interface
    DROP_MALFORMED = 10  # truncated L4 header, too many IPv6 extension headers
    DROP_ICMP = 11  # an ICMP type that is neither judged nor control
    EVENT_SUPPRESSED = 12  # counter only: drop event over the per-endpoint rate limit

    @property
    def is_drop(self) -> bool:
        return self >= Reason.DROP_NO_ENTRY and self != Reason.EVENT_SUPPRESSED


U8x16 = ctypes.c_uint8 * 16


class MetaValue(ctypes.Structure):
    _fields_ = [("layout_version", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class EndpointKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("addr", U8x16)]


class EndpointValue(ctypes.Structure):
    _fields_ = [
        ("endpoint_id", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),  # the endpoint id's counters slot
    ]


class IfaceValue(ctypes.Structure):
    _fields_ = [("endpoint_id", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class SlotState(enum.IntEnum):
    """``SlotValue.state``."""

    FREE = 0
    USED = 1  # the endpoint id has addresses in `endpoints`
    RETIRED = 2  # it has none left; its counts stay until the slot is given to another id


class SlotValue(ctypes.Structure):
    """``slots[slot]``: the endpoint id owning a counters slot."""

    _fields_ = [("endpoint_id", ctypes.c_uint32), ("state", ctypes.c_uint32)]


class PortRangeC(ctypes.Structure):
    _fields_ = [
        ("first", ctypes.c_uint16),
        ("last", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class AllowValue(ctypes.Structure):
    _fields_ = [
        ("expiry_ns", ctypes.c_uint64),
        ("nranges", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ranges", PortRangeC * MAX_PORT_RANGES),
    ]


class AllowKeyC(ctypes.Structure):
    """LPM key: prefixlen counts the 32 endpoint-id bits plus the address bits."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("endpoint_id", ctypes.c_uint32), ("addr", U8x16)]


class ExactKey(ctypes.Structure):
    _fields_ = [("endpoint_id", ctypes.c_uint32), ("addr", U8x16)]


class CtKey(ctypes.Structure):
    """A flow: the addresses are hashed into the key and stored in full in ``CtValue``."""

    _fields_ = [
        ("endpoint_id", ctypes.c_uint32),
        ("addr_hash", ctypes.c_uint32 * 2),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class CtValue(ctypes.Structure):
    _fields_ = [
        ("last_seen_ns", ctypes.c_uint64),  # coarse monotonic clock
        ("created_ns", ctypes.c_uint64),
        ("saddr", U8x16),
        ("daddr", U8x16),
    ]


class DnsKey(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", U8x16),
    ]


class DropEventC(ctypes.Structure):
    _fields_ = [
        ("timestamp_ns", ctypes.c_uint64),
        ("endpoint_id", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("audited", ctypes.c_uint16),
        ("saddr", U8x16),
        ("daddr", U8x16),
        ("pad", ctypes.c_uint32),
    ]


# C struct name -> mirror, for the layout assertions.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "meta_value": MetaValue,
    "endpoint_key": EndpointKey,
    "endpoint_value": EndpointValue,
    "iface_value": IfaceValue,
    "port_range": PortRangeC,
    "allow_value": AllowValue,
    "allow_key": AllowKeyC,
    "exact_key": ExactKey,
    "ct_key": CtKey,
    "ct_value": CtValue,
    "slot_value": SlotValue,
    "dns_key": DnsKey,
    "drop_event": DropEventC,
}

REASON_MAX = len(Reason)  # counters per slot (the C's REASON_MAX)

# Pinned map -> (key size, value size) it must have; a pinned map that differs is refused.
MAP_SIZES: dict[str, tuple[int, int]] = {
    "meta": (4, ctypes.sizeof(MetaValue)),
    "endpoints": (ctypes.sizeof(EndpointKey), ctypes.sizeof(EndpointValue)),
    "ifaces": (4, ctypes.sizeof(IfaceValue)),
    "allow": (ctypes.sizeof(AllowKeyC), ctypes.sizeof(AllowValue)),
    "allow_exact": (ctypes.sizeof(ExactKey), ctypes.sizeof(AllowValue)),
    "ct": (ctypes.sizeof(CtKey), ctypes.sizeof(CtValue)),
    "counters": (4, 8),  # index slot * REASON_MAX + reason; per-CPU u64
    "slots": (4, ctypes.sizeof(SlotValue)),
    "dns_targets": (ctypes.sizeof(DnsKey), 4),
}
MAP_SIZES.update(dict.fromkeys(WORKER_EXACT_MAPS, MAP_SIZES["allow_exact"]))


def layout_cflags() -> list[str]:
    """-D flags that make bpf/fqdn_egress.c assert this module's sizes, offsets and version."""
    items = []
    for cname, struct in STRUCTS.items():
        items.append(f"FQDN_EXPECT_SIZE({cname}, {ctypes.sizeof(struct)})")
        for fname, *_ in struct._fields_:
            items.append(f"FQDN_EXPECT({cname}, {fname}, {getattr(struct, fname).offset})")
    return [f"-DFQDN_EXPECT_LAYOUT_VERSION={LAYOUT_VERSION}", f"-DFQDN_EXPECT_REASON_MAX={REASON_MAX}",
            "-DFQDN_EXPECT_LAYOUT=" + " ".join(items)]


# --- addresses ---------------------------------------------------------------------------------


def pack_addr(address: Address) -> bytes:
    """Return the 16 bytes the maps hold: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    if address.version == 4:
        return V4_MAPPED + address.packed
    return address.packed


def unpack_addr(raw: bytes, family: int) -> Address:
    """Inverse of ``pack_addr``: ``family`` is 4 or 6."""
    raw = bytes(raw)
    if family == 4:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def _u8x16(raw: bytes) -> ctypes.Array[ctypes.c_uint8]:
    return U8x16.from_buffer_copy(raw)


def endpoint_key(address: Address) -> EndpointKey:
    """The ``endpoints`` key of a source address."""
    return EndpointKey(family=address.version, addr=_u8x16(pack_addr(address)))


def dns_key(address: Address, port: int, protocol: int) -> DnsKey:
    """The ``dns_targets`` key of the proxy's address, port and protocol (6 or 17)."""
    return DnsKey(family=address.version, protocol=protocol, port=port, addr=_u8x16(pack_addr(address)))


# --- allow entries -----------------------------------------------------------------------------


def trie_prefixlen(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """LPM prefixlen of ``network``: the endpoint id's 32 bits, then the (mapped) address bits."""
    return 32 + (96 if network.version == 4 else 0) + network.prefixlen


def encode_key(key: AllowKey) -> ExactKey | AllowKeyC:
    """The kernel key: ``ExactKey`` for a /32 or /128, else the LPM ``AllowKeyC``."""
    addr = _u8x16(pack_addr(key.network.network_address))
    if key.exact:
        return ExactKey(endpoint_id=key.endpoint_id, addr=addr)
    return AllowKeyC(prefixlen=trie_prefixlen(key.network), endpoint_id=key.endpoint_id, addr=addr)


def encode_value(entry: AllowEntry) -> AllowValue:
    """The kernel value of ``entry``."""
    value = AllowValue(expiry_ns=entry.expiry_ns, nranges=len(entry.ports))
    for slot, r in zip(value.ranges, entry.ports):
        slot.first, slot.last, slot.protocol = r.first, r.last, r.protocol
    return value


def decode_key(raw: ExactKey | AllowKeyC) -> AllowKey:
    """Inverse of ``encode_key``."""
    addr = bytes(raw.addr)
    if isinstance(raw, ExactKey) or not hasattr(raw, "prefixlen"):
        v4 = addr[:12] == V4_MAPPED
        return AllowKey(raw.endpoint_id, ipaddress.ip_network(unpack_addr(addr, 4 if v4 else 6)))
    bits = raw.prefixlen - 32
    if addr[:12] == V4_MAPPED and bits >= 96:
        return AllowKey(raw.endpoint_id, ipaddress.IPv4Network((addr[12:], bits - 96)))
    return AllowKey(raw.endpoint_id, ipaddress.IPv6Network((addr, bits)))


def decode_value(key: AllowKey, raw: AllowValue) -> AllowEntry:
    """Inverse of ``encode_value``."""
    ports = tuple(
        PortRange(r.protocol, r.first, r.last) for r in raw.ranges[: min(raw.nranges, MAX_PORT_RANGES)]
    )
    return AllowEntry(key.endpoint_id, key.network, raw.expiry_ns, ports or ((PortRange(),)))
