"""Parsed queries and answers, remembered by their bytes after the ID.

DNS traffic repeats itself: a pod asks for the same few names over and over, and the query its
stub resolver sends differs from the last one only in the 16-bit ID. An answer from an
authoritative server is byte-identical apart from the ID until its data changes; one from a
recursive resolver differs only in its ID and, once a second, its TTLs. Parsing is the largest
share of the proxy's own work per query, and ``wire.parse_query`` / ``wire.parse_response`` are
pure functions of the bytes, so the result for ``data[2:]`` is parsed once and rebuilt around the
current header (the ID, the only part left out of the key) on every repeat.

Nothing can be smuggled in through the cache: the key is every byte of the message except the
ID, and a message is its own key, so a forged answer is parsed (and judged) as what it is.
Messages that do not parse are not remembered (the error is raised every time).

Only a repeat is kept parsed: a message seen for the first time is remembered by its bytes alone
(in ``*_seen``, the same cap and FIFO rule), and parsed into the cache when it comes again. A
message that never repeats (every answer of a pass over new names, say) then costs one dict
entry of bytes, which the garbage collector never walks, instead of a parsed message of tens of
objects that would survive two collections, be promoted to the oldest generation and make full
collections more frequent and longer; it also cannot push a repeating message out. A message
that does repeat is parsed twice, once more than before.

Bounded: at most ``capacity`` messages per kind, each at most ``MAX_MESSAGE`` bytes (larger ones
are parsed every time; they are rare and would dominate the memory); when full, the oldest entry
goes (FIFO: a repeat re-enters at once, and FIFO costs nothing to maintain on a hit). Hits,
misses and evictions are counted for ``fqdnproxy_parse_cache_*``.
"""

from __future__ import annotations

from typing import Any

from fqdnproxy.dns import wire
from fqdnproxy.memo import BoundedMemo, MemoStats

MAX_MESSAGE = 1232  # bytes: the EDNS buffer size DNS flag day 2020 settled on
DEFAULT_CAPACITY = 4096  # messages per kind


def _rebuild_query(found: wire.Query, data: bytes) -> wire.Query:
    return wire.query_with_header(found, wire.parse_header(data))


def _rebuild_response(found: wire.Response, data: bytes) -> wire.Response:
    return wire.response_with_header(found, wire.parse_header(data))


class ParseCache:
    """``query(data)`` and ``response(data)``: ``wire.parse_query`` / ``wire.parse_response``,
    remembered. Same results, same ``WireError`` for bad input."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._queries: BoundedMemo[bytes, wire.Query] = BoundedMemo(capacity)
        self._responses: BoundedMemo[bytes, wire.Response] = BoundedMemo(capacity)
        # Messages seen once, by their bytes: parsed into the memos above on a repeat.
        self._queries_seen: BoundedMemo[bytes, bool] = BoundedMemo(capacity)
        self._responses_seen: BoundedMemo[bytes, bool] = BoundedMemo(capacity)
        self.capacity = capacity

    def query(self, data: bytes) -> wire.Query:
        """The parsed query (its header, ID included, read from ``data``).

        Raises:
            WireError: as ``wire.parse_query``.
        """
        key = bytes(data[2:])  # TCP hands over bytearrays; bytes(bytes) is no copy
        found = self._queries.get(key)
        if found is not None:
            return _rebuild_query(found, data)
        parsed = wire.parse_query(data)  # WireError propagates: nothing is remembered
        if len(data) <= MAX_MESSAGE:
            _remember(self._queries, self._queries_seen, key, parsed)
        return parsed

    def response(self, data: bytes) -> wire.Response:
        """The parsed answer (its header, ID included, read from ``data``).

        Raises:
            WireError: as ``wire.parse_response``.
        """
        key = bytes(data[2:])
        found = self._responses.get(key)
        if found is not None:
            return _rebuild_response(found, data)
        parsed = wire.parse_response(data)
        if len(data) <= MAX_MESSAGE:
            _remember(self._responses, self._responses_seen, key, parsed)
        return parsed

    def sizes(self) -> dict[str, int]:
        """Messages remembered, by kind ("query", "response": parsed; "query_seen",
        "response_seen": seen once, bytes only)."""
        return {"query": len(self._queries), "response": len(self._responses),
                "query_seen": len(self._queries_seen),
                "response_seen": len(self._responses_seen)}

    def stats(self) -> dict[str, MemoStats]:
        """Hits, misses and evictions, by kind (a hit of a ``*_seen`` kind is a repeat)."""
        return {"query": self._queries.stats, "response": self._responses.stats,
                "query_seen": self._queries_seen.stats,
                "response_seen": self._responses_seen.stats}


def _remember(parsed_memo: BoundedMemo[bytes, Any], seen: BoundedMemo[bytes, bool], key: bytes,
              parsed: Any) -> None:
    """Keep ``parsed`` if ``key`` was seen before, else remember that it has been seen now."""
    if seen.get(key):
        parsed_memo.put(key, parsed)
        seen.discard(key)
    else:
        seen.put(key, True)
