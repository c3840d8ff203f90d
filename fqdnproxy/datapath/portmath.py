"""Port-range arithmetic for allow entries: policy ports in, datapath ``PortRange`` tuples out.

An allow entry holds at most ``MAX_PORT_RANGES`` ranges; the kernel takes the longest matching
prefix and stops there, so each entry must carry the final answer for its addresses: the union of
every allow covering it, minus every deny covering it (denies win). Pure: no kernel access.
"""

from __future__ import annotations

from collections.abc import Iterable

from fqdnproxy.datapath.allowmap import MAX_PORT_RANGES, AllowEntryError, PortRange
from fqdnproxy.policy import model

ANY, TCP, UDP = 0, 6, 17
_PROTOCOL_NUMBERS = {"TCP": TCP, "UDP": UDP, "ANY": ANY}
# An entry that admits nothing: protocol 255 is reserved (RFC 5237), no packet carries it. The
# kernel's longest-prefix rule makes such an entry a deny for its prefix.
NO_PORTS: tuple[PortRange, ...] = (PortRange(255, 0, 0),)


class TooManyRanges(AllowEntryError):
    """More disjoint port ranges than one allow entry holds."""


def from_policy(ports: model.PortSet) -> tuple[PortRange, ...]:
    """A policy PortSet as datapath ranges (``ANY`` becomes protocol 0, any protocol)."""
    return tuple(PortRange(_PROTOCOL_NUMBERS.get(r.protocol.upper(), ANY), r.first, r.last)
                 for r in ports.ranges)


def merge(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Overlapping or adjacent ranges of one protocol merged, sorted.

    Raises:
        TooManyRanges: more than ``MAX_PORT_RANGES`` remain (never widened silently).
    """
    by_protocol: dict[int, list[tuple[int, int]]] = {}
    for r in ranges:
        if r.protocol == 255:
            continue  # the NO_PORTS marker adds nothing
        by_protocol.setdefault(r.protocol, []).append((r.first, r.last))
    merged: list[PortRange] = []
    for protocol, spans in sorted(by_protocol.items()):
        spans.sort()
        first, last = spans[0]
        for a, b in spans[1:]:
            if a <= last + 1:
                last = max(last, b)
            else:
                merged.append(PortRange(protocol, first, last))
                first, last = a, b
        merged.append(PortRange(protocol, first, last))
    # A protocol-0 range already admits TCP and UDP on its ports: drop what it covers.
    wildcards = [r for r in merged if r.protocol == ANY]
    merged = [r for r in merged if r.protocol == ANY or not any(
        w.first <= r.first and r.last <= w.last for w in wildcards)]
    if len(merged) > MAX_PORT_RANGES:
        raise TooManyRanges(f"{len(merged)} disjoint port ranges; an allow entry holds "
                            f"{MAX_PORT_RANGES}")
    return tuple(merged)


def subtract(ranges: tuple[PortRange, ...], minus: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """``ranges`` without ``minus`` (merged). Empty means nothing is admitted.

    A protocol-0 range minus a TCP or UDP range is split into its TCP and UDP halves first;
    other protocols (ICMP, ...) it admitted are dropped then: the entry only ever narrows.
    """
    minus = tuple(minus)
    if not minus:
        return merge(ranges)
    specific = {r.protocol for r in minus if r.protocol != ANY}
    expanded: list[PortRange] = []
    for r in ranges:
        if r.protocol == ANY and specific:
            expanded += [PortRange(TCP, r.first, r.last), PortRange(UDP, r.first, r.last)]
        else:
            expanded.append(r)
    result: list[PortRange] = []
    for r in expanded:
        pieces = [(r.first, r.last)]
        for m in minus:
            if m.protocol not in (ANY, r.protocol):
                continue
            pieces = [piece for a, b in pieces for piece in _cut(a, b, m.first, m.last)]
        result += [PortRange(r.protocol, a, b) for a, b in pieces]
    return merge(result)


def _cut(first: int, last: int, cut_first: int, cut_last: int) -> list[tuple[int, int]]:
    if cut_last < first or cut_first > last:
        return [(first, last)]
    pieces = []
    if first < cut_first:
        pieces.append((first, cut_first - 1))
    if cut_last < last:
        pieces.append((cut_last + 1, last))
    return pieces
