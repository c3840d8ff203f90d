"""``BoundedMemo``: the hot path's remembered results, capped, with their counts.

The query path remembers pure results it would otherwise recompute for every query: parsed
messages (``dns.parse_cache``) and policy verdicts (``policy.decider``). Each memo has a cap, an
eviction rule and counts for its metrics, as every cache on the hot path must. Eviction is FIFO:
the oldest entry goes, which costs nothing on a hit (no reordering) and lets a hot entry back in
on its next miss.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class MemoStats:
    """What one memo has done since it was made (read at scrape time)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class BoundedMemo(Generic[K, V]):
    """A dict of at most ``capacity`` entries (0: remembers nothing) that counts its lookups."""

    capacity: int
    # Ordered by insertion, oldest first. Not a plain dict: finding a dict's first entry walks
    # past every slot deleted since its last resize, which a full memo's churn makes long
    # (1.8-2.7% of the agent's CPU in the learn benchmark); ``popitem(last=False)`` is O(1).
    entries: OrderedDict[K, V] = field(default_factory=OrderedDict)
    stats: MemoStats = field(default_factory=MemoStats)

    def get(self, key: K) -> V | None:
        """The remembered value, or None (counted as a hit or a miss)."""
        found = self.entries.get(key)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, key: K, value: V) -> None:
        """Remember ``value``; the oldest entry goes when the memo is full."""
        if self.capacity <= 0:
            return
        if len(self.entries) >= self.capacity and key not in self.entries:
            self.entries.popitem(last=False)
            self.stats.evictions += 1
        self.entries[key] = value

    def discard(self, key: K) -> None:
        """Forget ``key`` if remembered (not an eviction: nothing is counted)."""
        self.entries.pop(key, None)

    def clear(self) -> None:
        """Forget every entry (the counts stay: they are totals)."""
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
