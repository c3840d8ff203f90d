"""The per-endpoint FQDN cache: which IPs each endpoint learned for each name, until when.

    endpoint id -> name -> IP -> expiry (kernel monotonic ns)

Learned IPs are per endpoint, never node-wide: endpoint B never reaches an IP that only endpoint
A looked up (DESIGN.md step 6). The cache is pure: no sockets, no kernel; callers pass ``now``.

What it is for:
- the learn stage asks it for the effective expiry of every (endpoint, IP) an answer touched (a
  repeat lookup never shortens a lifetime: the expiry kept is the later of the old and the new);
- policy changes re-evaluate cached names (which names has this endpoint resolved?);
- garbage collection finds expired entries in order of expiry, a bounded number per call;
- the snapshot makes entries survive a restart.

Caps, each with an eviction rule and a counter in ``evictions``:
- ``max_ips_per_name``: the IP that expires soonest goes first;
- ``max_names_per_endpoint``: the least recently looked-up name goes first;
- ``max_entries`` (all endpoints): the entry that expires soonest goes first.

Complexity: ``learn`` is O(k + log n) for k addresses (one heap push per distinct expiry, so one
per answer as a rule); ``expire`` is O(e + log n) for e entries removed (plus stale items
skipped); eviction by name is O(1) (names are kept in look-up order). A heap item holds the IPs
one answer raised to one expiry, not one IP: a million items were a third of the cache's memory.
Items made stale by a later refresh are skipped when popped, and the heap is rebuilt when the IPs
its items name outnumber twice the live entries, so its size stays within twice the entry count.

Memory (about 125 bytes an entry at 1M, IPv4): the IP as an integer key (``ipkey``), shared by
every index; one slot in its name's dict and one in the endpoint's holders; the expiry is one
int shared by the IPs of an answer; names are interned. IPs are text at the public methods; the
learn stage uses the ``*_keys`` methods, which take and give keys, and converts each IP once.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat

from fqdnproxy import ipkey

RESTORED = "restored"  # source of entries found in the pinned map but not in the snapshot
LOOKUP = "lookup"


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """The caps; see ``config.CacheConfig`` for the documented defaults."""

    max_ips_per_name: int = 1_000
    max_names_per_endpoint: int = 10_000
    max_entries: int = 1_000_000


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One learned (endpoint, name, IP) and when it expires."""

    endpoint_id: int
    name: str
    ip: str
    expiry_ns: int
    source: str = LOOKUP


@dataclass
class _Endpoint:
    # name -> ip key -> expiry; dict order is look-up order (least recent first)
    names: dict[str, dict[int, int]] = field(default_factory=dict)
    # ip key -> the name holding it, or a tuple of names when several do. Not a set per IP: a
    # million sets are a million objects for Python's cyclic GC to walk (a 200 ms pause at 1M
    # entries here); a str or a tuple of str is not tracked by it.
    holders: dict[int, str | tuple[str, ...]] = field(default_factory=dict)


class FqdnCache:
    """Per-endpoint name -> IP -> expiry, with caps. Not thread-safe: one event loop owns it."""

    def __init__(self, limits: CacheLimits = CacheLimits()) -> None:
        self.limits = limits
        self._endpoints: dict[int, _Endpoint] = {}
        # (expiry, endpoint, name, IPs that answer raised to that expiry, sorted)
        self._heap: list[tuple[int, int, str, tuple[int, ...]]] = []
        self._heap_ips = 0  # IPs named by heap items, stale ones included
        self._entries = 0
        self.evictions: dict[str, int] = {"ips_per_name": 0, "names_per_endpoint": 0,
                                           "entries": 0}

    # --- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of (endpoint, name, IP) entries."""
        return self._entries

    def endpoint_ids(self) -> list[int]:
        return list(self._endpoints)

    def names(self, endpoint_id: int) -> list[str]:
        """The names ``endpoint_id`` has resolved (restored entries under ``RESTORED``)."""
        endpoint = self._endpoints.get(endpoint_id)
        return list(endpoint.names) if endpoint else []

    def name_count(self) -> int:
        return sum(len(e.names) for e in self._endpoints.values())

    def ips(self, endpoint_id: int, name: str) -> dict[str, int]:
        """IP -> expiry learned by ``endpoint_id`` for ``name`` (a copy)."""
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return {}
        return {ipkey.text(k): expiry for k, expiry in endpoint.names.get(name, {}).items()}

    def holders(self, endpoint_id: int, ip: str) -> dict[str, int]:
        """name -> expiry of every name under which ``endpoint_id`` learned ``ip``."""
        return self.holders_of_key(endpoint_id, ipkey.key(ip))

    def holders_of_key(self, endpoint_id: int, ip_key: int) -> dict[str, int]:
        """``holders`` of an IP given as an ``ipkey`` key."""
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return {}
        held = endpoint.holders.get(ip_key)
        if held is None:
            return {}
        if type(held) is str:  # one name, by far the most common
            return {held: endpoint.names[held][ip_key]}
        names = endpoint.names
        return {name: names[name][ip_key] for name in held}

    def sole_holders_keys(self, endpoint_id: int, ip_keys: Iterable[int]
                          ) -> tuple[dict[str, dict[int, int]], list[int]]:
        """Split ``ip_keys`` (``ipkey`` keys) of ``endpoint_id`` by how many names hold them.

        Returns (name -> {key: expiry} for the keys that name alone holds, the other keys: held
        by several names, or by none). O(k) for k keys; the learn stage's common case, one name
        per IP, costs two dict lookups per IP and no dict per IP, unlike ``holders_of_key``.
        """
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return {}, list(ip_keys)
        holders = endpoint.holders
        names = endpoint.names
        ip_keys = list(ip_keys)
        held_by = list(map(holders.get, ip_keys))
        if held_by and type(held_by[0]) is str and held_by.count(held_by[0]) == len(held_by):
            # One name alone holds all of them (an answer's new IPs, as a rule): no Python
            # step per IP.
            ips = names[held_by[0]]
            return {held_by[0]: dict(zip(ip_keys, map(ips.__getitem__, ip_keys)))}, []
        sole: dict[str, dict[int, int]] = {}
        rest: list[int] = []
        last: str | None = None
        group: dict[int, int] = {}
        ips: dict[int, int] = {}
        for k in ip_keys:
            held = holders.get(k)
            if type(held) is not str:  # several names (a tuple), or none
                rest.append(k)
                continue
            if held is not last:  # names are interned: one name's IPs share one string
                last = held
                ips = names[held]
                group = sole.get(held)  # type: ignore[assignment]
                if group is None:
                    group = sole[held] = {}
            group[k] = ips[k]
        return sole, rest

    def keys(self, endpoint_id: int) -> set[int]:
        """The ``ipkey`` keys of every IP ``endpoint_id`` learned."""
        endpoint = self._endpoints.get(endpoint_id)
        return set(endpoint.holders) if endpoint is not None else set()

    def entries(self, endpoint_id: int | None = None) -> Iterator[CacheEntry]:
        """Every entry (of one endpoint, or all)."""
        ids = [endpoint_id] if endpoint_id is not None else list(self._endpoints)
        for eid in ids:
            endpoint = self._endpoints.get(eid)
            if endpoint is None:
                continue
            for name, ips in endpoint.names.items():
                source = RESTORED if name == RESTORED else LOOKUP
                for k, expiry in ips.items():
                    yield CacheEntry(eid, name, ipkey.text(k), expiry, source)

    # --- writing ------------------------------------------------------------------------------

    def learn(self, endpoint_id: int, name: str, addresses: Iterable[tuple[str, int]],
              now_ns: int = 0, headroom: float = 0.0) -> set[str]:
        """Record ``addresses`` ((ip, expiry_ns) pairs) under ``name`` for ``endpoint_id``.

        An IP already known under the name keeps the later of its two expiries. Returns every IP
        of this endpoint whose holders or expiry may have changed (learned or evicted), for the
        caller to rewrite in the allow map.

        ``headroom`` (a fraction of the lifetime ``expiry - now_ns``) is added to an expiry when
        it has to be raised: repeat lookups within that headroom need no raise, so they cost the
        allow map no write, at the price of an entry outliving its TTL by that fraction.
        """
        touched = self.learn_keys(endpoint_id, name,
                                  [(ipkey.key(ip), expiry) for ip, expiry in addresses],
                                  now_ns, headroom)
        return {ipkey.text(k) for k in touched}

    def learn_keys(self, endpoint_id: int, name: str, addresses: Iterable[tuple[int, int]],
                   now_ns: int = 0, headroom: float = 0.0) -> set[int]:
        """``learn`` with IPs as ``ipkey`` keys, in and out."""
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            endpoint = self._endpoints[endpoint_id] = _Endpoint()
        name = sys.intern(name)  # one string per name, however many answers and endpoints
        ips = endpoint.names.pop(name, None)  # re-inserted below: most recently looked up
        touched: set[int] = set()
        if ips is None:
            ips = {}
            if len(endpoint.names) >= self.limits.max_names_per_endpoint:
                touched |= self._evict_name(endpoint_id, endpoint)
        endpoint.names[name] = ips
        holders = endpoint.holders
        # expiry asked -> (expiry kept, the IPs raised to it): one heap item and one int each
        raised: dict[int, tuple[int, list[int]]] = {}
        added = 0
        group: tuple[int, list[int]] = (0, [])
        last_expiry = None  # an answer's IPs mostly share one expiry: skip the dict for them
        for ip, expiry in addresses:
            old = ips.get(ip)
            if old is not None and expiry <= old:
                continue
            if expiry != last_expiry:
                last_expiry = expiry
                group = raised.get(expiry)  # type: ignore[assignment]
                if group is None:
                    kept = expiry + int((expiry - now_ns) * headroom) if headroom else expiry
                    group = raised[expiry] = (kept, [])
            ips[ip] = group[0]
            group[1].append(ip)
            if old is None:
                if ip in holders:
                    _add_holder(holders, ip, name)
                else:
                    holders[ip] = name
                added += 1
            touched.add(ip)
        self._entries += added
        for kept, group in raised.values():
            self._push(kept, endpoint_id, name, group)
        return touched | self._enforce_caps(endpoint_id, endpoint, name)

    def learn_keys_at(self, endpoint_id: int, name: str, keys: list[int], expiry: int,
                      now_ns: int = 0, headroom: float = 0.0) -> set[int]:
        """``learn_keys`` of ``keys``, all at one ``expiry``: an answer with one TTL.

        A name the endpoint has not learned yet (the learn stage's common case) is stored
        without a Python step per IP unless another name holds one of them; anything else takes
        ``learn_keys``. The two leave the cache in the same state (tests check).
        """
        endpoint = self._endpoints.get(endpoint_id)
        name = sys.intern(name)
        if endpoint is None:
            return self.learn_keys(endpoint_id, name, zip(keys, repeat(expiry)), now_ns, headroom)
        ips = endpoint.names.get(name)
        if ips is not None:
            if keys and min(map(ips.get, keys, repeat(0))) >= expiry:
                # A repeat within the headroom: nothing to raise, the name is only looked up.
                del endpoint.names[name]
                endpoint.names[name] = ips
                return set()
            return self.learn_keys(endpoint_id, name, zip(keys, repeat(expiry)), now_ns, headroom)
        touched: set[int] = set()
        if len(endpoint.names) >= self.limits.max_names_per_endpoint:
            touched |= self._evict_name(endpoint_id, endpoint)
        kept = expiry + int((expiry - now_ns) * headroom) if headroom else expiry
        ips = endpoint.names[name] = dict.fromkeys(keys, kept)
        holders = endpoint.holders
        shared = {k: holders[k] for k in holders.keys() & ips.keys()}  # held by other names
        holders.update(dict.fromkeys(ips, name))
        for k, held in shared.items():  # those are held by both now
            holders[k] = held
            _add_holder(holders, k, name)
        self._entries += len(ips)
        if ips:
            self._push(kept, endpoint_id, name, ips)
        touched.update(ips)
        return touched | self._enforce_caps(endpoint_id, endpoint, name)

    def _enforce_caps(self, endpoint_id: int, endpoint: _Endpoint, name: str) -> set[int]:
        """After ``name`` of ``endpoint_id`` learned: evict past the per-name and total caps,
        compact the heap if due; the IPs evicted."""
        evicted: set[int] = set()
        if len(endpoint.names[name]) > self.limits.max_ips_per_name:
            evicted |= self._evict_soonest_ips(endpoint_id, endpoint, name)
        while self._entries > self.limits.max_entries:
            evicted |= self._evict_soonest_entry()
        self._maybe_compact()
        return evicted

    def remove_endpoint(self, endpoint_id: int) -> set[str]:
        """Forget everything ``endpoint_id`` learned; returns its IPs."""
        return {ipkey.text(k) for k in self.remove_endpoint_keys(endpoint_id)}

    def remove_endpoint_keys(self, endpoint_id: int) -> set[int]:
        """``remove_endpoint``, returning the IPs' ``ipkey`` keys."""
        endpoint = self._endpoints.pop(endpoint_id, None)
        if endpoint is None:
            return set()
        self._entries -= sum(len(ips) for ips in endpoint.names.values())
        return set(endpoint.holders)

    def remove_name(self, endpoint_id: int, name: str) -> set[str]:
        """Forget one name of one endpoint (``cache clean``); returns the IPs it held."""
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None or name not in endpoint.names:
            return set()
        return {ipkey.text(k) for k in self._drop_name(endpoint, name)}

    def expire(self, now_ns: int, budget: int) -> list[tuple[int, str]]:
        """Remove up to ``budget`` entries expired at ``now_ns``, soonest first.

        Returns the (endpoint, IP) pairs that lost a holder, for the caller to rewrite or delete.
        Bounded work per call is what keeps garbage collection from holding the event loop.
        """
        return [(endpoint_id, ipkey.text(k)) for endpoint_id, k in self.expire_keys(now_ns, budget)]

    def expire_keys(self, now_ns: int, budget: int) -> list[tuple[int, int]]:
        """``expire``, with IPs as ``ipkey`` keys."""
        touched: list[tuple[int, int]] = []
        heap = self._heap
        while heap and budget > 0 and heap[0][0] <= now_ns:
            expiry, endpoint_id, name, ips = self._pop()
            for index, ip in enumerate(ips):
                if budget == 0:  # the rest waits for the next call, still first in line
                    self._push(expiry, endpoint_id, name, ips[index:])
                    break
                if self._remove_if_current(endpoint_id, name, ip, expiry):
                    touched.append((endpoint_id, ip))
                    budget -= 1
        return touched

    def next_expiry(self) -> int | None:
        """The earliest expiry in the heap (possibly stale), or None when empty."""
        return self._heap[0][0] if self._heap else None

    # --- eviction -----------------------------------------------------------------------------

    def _evict_name(self, endpoint_id: int, endpoint: _Endpoint) -> set[int]:
        oldest = next(iter(endpoint.names))
        self.evictions["names_per_endpoint"] += 1
        return self._drop_name(endpoint, oldest)

    def _evict_soonest_ips(self, endpoint_id: int, endpoint: _Endpoint, name: str) -> set[int]:
        ips = endpoint.names[name]
        excess = len(ips) - self.limits.max_ips_per_name
        doomed = heapq.nsmallest(excess, ips.items(), key=lambda item: item[1])
        for ip, _ in doomed:
            self._unlink(endpoint, name, ip)
        self.evictions["ips_per_name"] += excess
        return {ip for ip, _ in doomed}

    def _evict_soonest_entry(self) -> set[int]:
        while self._heap:
            expiry, endpoint_id, name, ips = self._pop()
            for index, ip in enumerate(ips):
                if self._remove_if_current(endpoint_id, name, ip, expiry):
                    if index + 1 < len(ips):
                        self._push(expiry, endpoint_id, name, ips[index + 1:])
                    self.evictions["entries"] += 1
                    return {ip}
        return set()

    def _drop_name(self, endpoint: _Endpoint, name: str) -> set[int]:
        ips = list(endpoint.names[name])
        for ip in ips:
            self._unlink(endpoint, name, ip)
        endpoint.names.pop(name, None)
        return set(ips)

    def _remove_if_current(self, endpoint_id: int, name: str, ip: int, expiry: int) -> bool:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return False
        ips = endpoint.names.get(name)
        if ips is None or ips.get(ip) != expiry:
            return False  # stale heap item: refreshed, evicted or removed since
        self._unlink(endpoint, name, ip)
        if not ips:
            del endpoint.names[name]
        if not endpoint.names:
            del self._endpoints[endpoint_id]
        return True

    def _unlink(self, endpoint: _Endpoint, name: str, ip: int) -> None:
        del endpoint.names[name][ip]
        remaining = tuple(n for n in _names(endpoint.holders[ip]) if n != name)
        if not remaining:
            del endpoint.holders[ip]
        else:
            endpoint.holders[ip] = remaining[0] if len(remaining) == 1 else remaining
        self._entries -= 1

    def _push(self, expiry: int, endpoint_id: int, name: str, ips: Iterable[int]) -> None:
        item = (expiry, endpoint_id, name, tuple(sorted(ips)))
        heapq.heappush(self._heap, item)
        self._heap_ips += len(item[3])

    def _pop(self) -> tuple[int, int, str, tuple[int, ...]]:
        item = heapq.heappop(self._heap)
        self._heap_ips -= len(item[3])
        return item

    def _maybe_compact(self) -> None:
        if self._heap_ips > 2 * self._entries + 1024:
            groups: dict[tuple[int, int, str], list[int]] = {}
            for eid, e in self._endpoints.items():
                for name, ips in e.names.items():
                    for ip, expiry in ips.items():
                        groups.setdefault((expiry, eid, name), []).append(ip)
            self._heap = [(expiry, eid, name, tuple(sorted(ips)))
                          for (expiry, eid, name), ips in groups.items()]
            heapq.heapify(self._heap)
            self._heap_ips = self._entries

    # --- snapshot -----------------------------------------------------------------------------

    def snapshot_chunks(self, chunk_size: int = 5_000) -> Iterator[list[tuple[int, str, str, int]]]:
        """Every entry as (endpoint, name, ip, expiry), in lists of about ``chunk_size``.

        The caller may yield to the event loop between chunks: each level is copied when it is
        visited, so changes made in between never break the iteration (they may or may not be
        in the snapshot, which the restore reconciles against the pinned map anyway).
        """
        chunk: list[tuple[int, str, str, int]] = []
        for endpoint_id, endpoint in list(self._endpoints.items()):
            for name, ips in list(endpoint.names.items()):
                chunk.extend((endpoint_id, name, ipkey.text(k), expiry)
                             for k, expiry in list(ips.items()))
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def restore(self, entries: Iterable[CacheEntry]) -> int:
        """Load entries (from a snapshot or the pinned map); returns how many were added."""
        added = 0
        for entry in entries:
            before = self._entries
            self.learn(entry.endpoint_id, entry.name, [(entry.ip, entry.expiry_ns)])
            added += self._entries - before
        return added


def _names(held: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if held is None:
        return ()
    return (held,) if isinstance(held, str) else held


def _add_holder(holders: dict[int, str | tuple[str, ...]], ip: int, name: str) -> None:
    held = holders.get(ip)
    if held is None:
        holders[ip] = name
    elif isinstance(held, str):
        if held != name:
            holders[ip] = (held, name)
    elif name not in held:
        holders[ip] = (*held, name)
