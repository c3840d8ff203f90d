"""Drop events from the program's ring buffer, decoded by field name.

The kernel rate-limits events per endpoint (FQDN_EVENTS_PER_SEC, default 100 a second; the rest
only bump the EVENT_SUPPRESSED counter), so a reader that falls behind loses events, never
packets.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fqdnproxy.datapath import maps


@dataclass(frozen=True)
class DropEvent:
    """One dropped (or, with AUDIT, would-be dropped) packet."""

    timestamp_ns: int  # kernel monotonic
    endpoint_id: int
    reason: maps.Reason
    ifindex: int
    protocol: int
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    audited: bool

    @classmethod
    def decode(cls, raw: maps.DropEventC) -> DropEvent:
        """Decode the C struct drop_event."""
        return cls(
            timestamp_ns=raw.timestamp_ns,
            endpoint_id=raw.endpoint_id,
            reason=maps.Reason(raw.reason),
            ifindex=raw.ifindex,
            protocol=raw.protocol,
            source=maps.unpack_addr(bytes(raw.saddr), raw.family),
            destination=maps.unpack_addr(bytes(raw.daddr), raw.family),
            sport=raw.sport,
            dport=raw.dport,
            audited=bool(raw.audited),
        )


class DropEventReader:
    """Reads the ring buffer of one loaded program (``EgressDatapath.drop_events()``)."""

    def __init__(self, bpf: Any, sink: Callable[[DropEvent], None] | None = None) -> None:
        self._bpf = bpf
        self._pending: list[DropEvent] = []
        self._sink = sink
        bpf[b"events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: object, data: int, size: int) -> int:
        if size >= ctypes.sizeof(maps.DropEventC):
            event = DropEvent.decode(ctypes.cast(data, ctypes.POINTER(maps.DropEventC)).contents)
            if self._sink is not None:
                self._sink(event)
            else:
                self._pending.append(event)
        return 0

    def poll(self, timeout_ms: int = 0) -> list[DropEvent]:
        """Wait up to ``timeout_ms`` for events; return those read (empty with a sink)."""
        self._bpf.ring_buffer_poll(timeout_ms)
        events, self._pending = self._pending, []
        return events
