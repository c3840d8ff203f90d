"""The learn stage: turn an allowed answer into allow-map entries before it is released.

For the query name and its endpoint (DESIGN.md steps 6 and 7):

1. each address's TTL is the smallest on its CNAME chain (``wire.Response.addresses``), floored
   at ``min_ttl`` so a TTL-0 answer still lets the immediate connection through;
2. the cache records (endpoint, name, IP, expiry), keeping the later expiry on a repeat;
3. for every IP the cache says changed, the map entry is recomputed from everything the endpoint
   learned for that IP: the ports are the union of ``select(name)`` over the names holding it,
   plus the ports of any static CIDR rule covering it (the longest match wins in the kernel, so a
   /32 inside a broader CIDR entry must carry that entry's ports too); the expiry is the latest
   among the selected names. An IP no selected name holds any more loses its entry.
4. the entries are written synchronously; if the map refuses, ``LearnError``: the proxy answers
   SERVFAIL, because an answer whose connection the datapath would drop must never be released.

Only NOERROR answers with addresses teach anything. Entries are per endpoint only.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fqdnproxy.datapath import allowmap, portmath
from fqdnproxy.datapath.allowmap import (
    AllowEntry, AllowEntryError, AllowKey, AllowMapWriter, HostAllows, PortRange, kernel_now_ns)
from fqdnproxy.dns import wire
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.exchange import AllowedIp, Exchange, LearnError
from fqdnproxy import ipkey
from fqdnproxy.fqdn.cache import RESTORED, FqdnCache
from fqdnproxy.fqdn.statics import StaticIndex

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class LearnSettings:
    """See ``config.CacheConfig`` for the documented defaults."""

    min_ttl: int = 60  # seconds
    ttl_headroom: float = 0.1  # an entry may outlive its TTL by this fraction (FqdnCache.learn)
    # What ``learn`` returns is for the audit record only; without an audit log nobody reads
    # it, and building it was 7% of the agent's CPU in the learn benchmark (20 IPs an answer).
    report_allowed: bool = True


def describe_ports(ranges: Iterable[PortRange]) -> str:
    return ",".join(str(r) for r in ranges)


class AllowLearner:
    """``Learner`` writing to an ``AllowMapWriter`` (the kernel map, or in memory in tests)."""

    def __init__(self, cache: FqdnCache, writer: AllowMapWriter,
                 policy_for: Callable[[int], object | None],
                 settings: LearnSettings = LearnSettings(),
                 clock: Callable[[], int] = kernel_now_ns,
                 wall: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.writer = writer
        self.settings = settings
        # endpoint id -> its current EndpointPolicy, or None once the endpoint is gone
        self._policy_for = policy_for
        # Map entries found at start without a name (cache.RESTORED): their ports, kept as they
        # were until they expire, since no name says what they should be now.
        self._restored: dict[tuple[int, int], tuple[PortRange, ...]] = {}  # (endpoint, ip key)
        self._clock = clock
        self._wall = wall

    def learn(self, exchange: Exchange, response: wire.Response) -> tuple[AllowedIp, ...]:
        """Record the answer's addresses and write their entries; what the endpoint may reach.

        Raises:
            LearnError: the entries could not be written.
        """
        decision = exchange.decision
        if decision is None or decision.endpoint is None or decision.policy is None:
            return ()
        if response.header.rcode != 0 or not response.addresses:
            return ()
        now = self._clock()
        floor = self.settings.min_ttl
        endpoint_id = decision.endpoint.id
        addresses = response.addresses
        keys = [a.key for a in addresses]
        ttls = [a.ttl for a in addresses]
        name = exchange.query.question.name
        headroom = self.settings.ttl_headroom
        if ttls.count(ttls[0]) == len(ttls):  # one TTL, as in nearly every answer
            touched = self.cache.learn_keys_at(endpoint_id, name, keys,
                                               now + max(ttls[0], floor) * NS, now, headroom)
        else:
            expiries: dict[int, int] = {}  # TTL -> expiry
            learned = []
            for k, ttl in zip(keys, ttls):
                expiry = expiries.get(ttl)
                if expiry is None:
                    expiry = expiries[ttl] = now + max(ttl, floor) * NS
                learned.append((k, expiry))
            touched = self.cache.learn_keys(endpoint_id, name, learned, now, headroom)
        if not decision.policy.enforced or not touched:
            return ()
        # The answer's own IPs never need a delete: had no rule selected them before, nothing
        # was written for them. IPs a cap evicted may have had an entry.
        answered = set(keys)
        written = self._sync(decision.policy, endpoint_id, touched & answered, delete=False)
        if touched - answered:
            self._sync(decision.policy, endpoint_id, touched - answered)
        if not self.settings.report_allowed:
            return ()
        return _allowed_ips(keys, addresses, written.expiry_and_ports(),
                            self._wall() - now / NS)

    def sync(self, policy: object, endpoint_id: int, ips: Iterable[str],
             delete: bool = True) -> dict[str, AllowEntry]:
        """Rewrite (or delete) the map entries of ``ips`` from the cache and ``policy``.

        Used by ``learn`` and by policy re-evaluation. Returns the entries written, by IP.
        ``delete`` False skips deleting keys that should not exist, for IPs that cannot have
        an entry yet (just learned under a name no rule selects).

        Raises:
            LearnError: the map refused the write.
        """
        written = self._sync(policy, endpoint_id, {ipkey.key(ip) for ip in ips}, delete)
        return {ipkey.text(k): entry for k, entry in written.entries().items()}

    def _sync(self, policy: object, endpoint_id: int, ip_keys: Iterable[int],
              delete: bool = True) -> Written:
        """``sync`` of IPs given as ``ipkey`` keys; what was written."""
        upserts: dict[int, AllowEntry] = {}
        hosts: list[HostAllows] = []
        deletes: list[AllowKey] = []
        memo = SyncMemo(policy)
        sole, rest = self.cache.sole_holders_keys(endpoint_id, ip_keys)
        for name, held in sole.items():
            rest += self._sole_entries(endpoint_id, name, held, memo, hosts)
        for k in rest:
            entry = self._entry_for_key(policy, endpoint_id, k, memo)
            if entry is None:
                if delete:
                    deletes.append(AllowKey(endpoint_id, _network(k)))
            else:
                upserts[k] = entry
        try:
            for batch in hosts:
                self.writer.upsert_hosts(batch)
            if upserts:
                self.writer.upsert_allows(list(upserts.values()))
            if deletes:
                self.writer.delete_allows(deletes)
        except (OSError, FqdnproxyError) as error:
            raise LearnError(f"allow map refused the entries: {error}") from error
        return Written(upserts, hosts)

    def _sole_entries(self, endpoint_id: int, name: str, held: dict[int, int], memo: SyncMemo,
                      hosts: list[HostAllows]) -> list[int]:
        """Add to ``hosts`` the entries of IPs ``name`` alone holds (key -> expiry in
        ``held``), as one batch; return the keys this cannot decide, for ``_entry_for_key``.

        ``_entry_for_key`` for the learn stage's common case, one answer's new IPs, without its
        per-IP work: one name holds the IP, so its ranges and expiry are the name's, unless a
        static rule covers the IP (then the merge needs ``cover``) or the name is selected by
        no rule (then restored ports or deletion decide). Tests check the two agree.
        """
        if name == RESTORED:
            return list(held)
        ranges = memo.ranges(name)
        if not ranges:
            return list(held)
        try:
            final = memo.final_alone(ranges)
        except AllowEntryError as error:
            raise LearnError(str(error)) from error
        if not final:
            return list(held)
        covered = memo.statics.covered_keys(held)
        if covered:
            keys = [k for k in held if k not in covered]
            batch = HostAllows(endpoint_id, final, keys, [held[k] for k in keys])
        else:  # no per-IP work in Python at all
            batch = HostAllows(endpoint_id, final, list(held), list(held.values()))
        if batch.keys:
            hosts.append(batch)
        return list(covered)

    def keep_restored(self, entry: AllowEntry) -> None:
        """Remember the ports of a map entry restored at start without a name."""
        self._restored[(entry.endpoint_id, ipkey.key(str(entry.network.network_address)))] = \
            entry.ports

    def entry_for(self, policy: object, endpoint_id: int, ip: str,
                  memo: SyncMemo | None = None) -> AllowEntry | None:
        """The one map entry for (endpoint, ``ip``/32 or /128), or None if it should not exist.

        Everything that decides this exact key meets here, so nothing else writes it: the names
        the endpoint learned the IP under (ports selected, latest expiry), entries restored at
        start, and the static rules covering the IP (allows added, denies taken away). A static
        rule naming exactly this address (toCIDR 192.0.2.7/32, a toEndpoints peer) makes the
        entry static: expiry 0, kept even when nothing was learned, and written as a deny
        marker when denies leave no ports. ``memo`` carries what one sync computes once for all
        its IPs (``select`` per name, and the ranges of a name alone).
        """
        return self._entry_for_key(policy, endpoint_id, ipkey.key(ip), memo)

    def _entry_for_key(self, policy: object, endpoint_id: int, ip_key: int,
                       memo: SyncMemo | None = None) -> AllowEntry | None:
        """``entry_for`` an IP given as an ``ipkey`` key."""
        if memo is None:
            memo = SyncMemo(policy)
        allowed: tuple[PortRange, ...] = ()
        learned = False
        expiry = 0
        holders = self.cache.holders_of_key(endpoint_id, ip_key)
        for name, name_expiry in holders.items():
            if name == RESTORED:
                ranges = self._restored.get((endpoint_id, ip_key), ())
            else:
                ranges = memo.ranges(name)
            if ranges:
                allowed += ranges
                learned = True
                if name_expiry > expiry:
                    expiry = name_expiry
        if not learned:
            self._restored.pop((endpoint_id, ip_key), None)
        family, address = ipkey.split(ip_key)
        static_allowed, denied, static = memo.statics.cover(family, address)
        if not learned and not static:
            return None
        try:
            if len(holders) == 1 and not static_allowed and not denied:
                # One name and no static rule: its ranges, merged once per sync.
                ranges = memo.final_alone(allowed)
            else:
                ranges = _final_ranges(allowed + static_allowed, denied)
        except AllowEntryError as error:
            raise LearnError(str(error)) from error
        if static:
            return AllowEntry.trusted(endpoint_id, allowmap.host_network(family, address), 0,
                                      ranges or portmath.NO_PORTS)
        if not ranges:
            return None  # wholly denied: the broader static deny entry decides
        return AllowEntry.trusted(endpoint_id, allowmap.host_network(family, address), expiry,
                                  ranges)

    # --- outside the query path -----------------------------------------------------------------

    def reevaluate(self, endpoint_ids: Iterable[int] | None = None) -> int:
        """Rewrite the entries of cached endpoints after a policy or inventory change.

        Names newly selected get their IPs allowed at once, names no longer selected lose them,
        and an endpoint that left the inventory loses everything. Returns entries rewritten or
        deleted. ``endpoint_ids`` None means every cached endpoint.
        """
        changed = 0
        for endpoint_id in list(endpoint_ids if endpoint_ids is not None
                                else self.cache.endpoint_ids()):
            policy = self._policy_for(endpoint_id)
            if policy is None:
                changed += self._delete(endpoint_id, self.cache.remove_endpoint_keys(endpoint_id))
                continue
            ip_keys = self.cache.keys(endpoint_id)
            self._sync(policy, endpoint_id, ip_keys)
            changed += len(ip_keys)
        return changed

    def collect_garbage(self, now_ns: int, budget: int) -> int:
        """Drop up to ``budget`` expired cache entries and fix their map entries; how many.

        The kernel already ignores expired entries; this frees their space in the cache and the
        map. Bounded work per call, so the agent can run it between queries.
        """
        expired = self.cache.expire_keys(now_ns, budget)
        by_endpoint: dict[int, set[int]] = {}
        for endpoint_id, k in expired:
            by_endpoint.setdefault(endpoint_id, set()).add(k)
        for endpoint_id, ips in by_endpoint.items():
            policy = self._policy_for(endpoint_id)
            if policy is None or not getattr(policy, "enforced", False):
                self._delete(endpoint_id, ips)
            else:
                try:
                    self._sync(policy, endpoint_id, ips)
                except LearnError:
                    pass  # rewrites of still-held IPs are retried by the next lookup
        return len(expired)

    def delete(self, endpoint_id: int, ips: Iterable[str]) -> int:
        """Delete the map entries of ``ips`` (text) of ``endpoint_id``; how many existed."""
        return self._delete(endpoint_id, {ipkey.key(ip) for ip in ips})

    def _delete(self, endpoint_id: int, ip_keys: Iterable[int]) -> int:
        keys = [AllowKey(endpoint_id, _network(k)) for k in ip_keys]
        if not keys:
            return 0
        try:
            return self.writer.delete_allows(keys)
        except (OSError, FqdnproxyError):
            return 0  # expired entries are harmless: the kernel checks expiry itself


@dataclass(frozen=True, slots=True)
class Written:
    """What one ``_sync`` wrote: entries one by one, and host batches (``_sole_entries``)."""

    upserts: dict[int, AllowEntry]  # by ipkey key
    hosts: list[HostAllows]

    def entries(self) -> dict[int, AllowEntry]:
        """Every entry written, by ipkey key."""
        out = dict(self.upserts)
        for batch in self.hosts:
            out.update(zip(batch.keys, batch.entries()))
        return out

    def expiry_and_ports(self) -> dict[int, tuple[int, tuple[PortRange, ...]]]:
        """(expiry, ports) of every entry written, by ipkey key, without building entries."""
        out = {k: (e.expiry_ns, e.ports) for k, e in self.upserts.items()}
        for batch in self.hosts:
            ports = batch.ports
            out.update(zip(batch.keys, [(expiry, ports) for expiry in batch.expiries]))
        return out


def _allowed_ips(keys: list[int], addresses: tuple[wire.Address, ...],
                 written: dict[int, tuple[int, tuple[PortRange, ...]]], wall_offset: float
                 ) -> tuple[AllowedIp, ...]:
    """What ``learn`` returns: the answer's addresses that have an entry, in answer order."""
    allowed_ips = []
    last_ports: object = None
    last_expiry = -1
    text = ""
    when = 0.0
    get = written.get
    for k, a in zip(keys, addresses):
        found = get(k)
        if found is None:
            continue
        expiry_ns, ports = found
        if ports is not last_ports or expiry_ns != last_expiry:  # an answer's entries share them
            if ports is not last_ports:
                text = describe_ports(ports)
            last_ports, last_expiry = ports, expiry_ns
            when = expiry_ns / NS + wall_offset
        # AllowedIp(a.ip, when, text), built as wire.py builds its records (see below)
        allowed = _new(AllowedIp)
        _set_allowed_ip(allowed, a.ip)
        _set_allowed_expires(allowed, when)
        _set_allowed_ports(allowed, text)
        allowed_ips.append(allowed)
    return tuple(allowed_ips)


# AllowedIp is a frozen dataclass: its __init__ stores each field through object.__setattr__.
# One per learned IP is built through the slot descriptors instead, as wire.py builds its
# records (equal objects; tests/fqdn/test_learner.py checks).
_set_allowed_ip, _set_allowed_expires, _set_allowed_ports = (
    AllowedIp.__dict__[name].__set__ for name in ("ip", "expires", "ports"))


def _allowed_ip(ip: str, expires: float, ports: str) -> AllowedIp:
    """``AllowedIp(ip, expires, ports)``, the way ``_allowed_ips`` builds it."""
    allowed = _new(AllowedIp)
    _set_allowed_ip(allowed, ip)
    _set_allowed_expires(allowed, expires)
    _set_allowed_ports(allowed, ports)
    return allowed


_new = object.__new__


class SyncMemo:
    """What one ``sync`` (of one policy) computes once for all its IPs (one answer's, mostly)."""

    __slots__ = ("alone", "policy", "selected", "statics")

    def __init__(self, policy: object) -> None:
        self.policy = policy
        self.statics = _static_index(policy)
        self.selected: dict[str, tuple[PortRange, ...]] = {}  # name -> ranges select(name) gives
        # id(ranges of one name) -> (those ranges, merged). By identity: hashing a tuple of
        # PortRange calls each one's __hash__ in Python, a microsecond per IP for nothing, and
        # one name's ranges are one object for the whole sync (kept alive here).
        self.alone: dict[int, tuple[tuple[PortRange, ...], tuple[PortRange, ...]]] = {}

    def ranges(self, name: str) -> tuple[PortRange, ...]:
        """The ranges the policy's selectors give ``name`` (empty: no selector selects it)."""
        ranges = self.selected.get(name)
        if ranges is None:
            selected = self.policy.select(name)  # type: ignore[attr-defined]
            ranges = self.selected[name] = (
                _policy_ranges(selected) if selected is not None else ())
        return ranges

    def final_alone(self, ranges: tuple[PortRange, ...]) -> tuple[PortRange, ...]:
        """``ranges`` of one name with no static rule, merged (once per sync).

        Raises:
            AllowEntryError: more ranges than the datapath holds.
        """
        alone = self.alone.get(id(ranges))
        if alone is None:
            alone = self.alone[id(ranges)] = (ranges, _final_ranges(ranges, ()))
        return alone[1]


_network = allowmap.host_key_network  # the /32 or /128 of an ``ipkey`` key


# --- memos -------------------------------------------------------------------------------------
# The learn stage runs for every answer and mostly sees the same policies and port sets again;
# each memo is an LRU with a cap (its size is exported as fqdnproxy_learner_memo_entries). Keys
# hold policy objects, so a replaced policy is never confused with its successor. Nothing here is
# per IP: a new IP costs integer arithmetic, not a memo entry.

@functools.lru_cache(maxsize=4_096)
def _policy_ranges(ports: object) -> tuple[PortRange, ...]:
    return portmath.from_policy(ports)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4_096)
def _static_index(policy: object) -> StaticIndex:
    """The static allows and denies of ``policy`` (one per endpoint) as prefix tables."""
    return StaticIndex(policy.allows, policy.denies, _policy_ranges)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4_096)
def _final_ranges(allowed: tuple[PortRange, ...], denied: tuple[PortRange, ...]
                  ) -> tuple[PortRange, ...]:
    return portmath.subtract(allowed, denied)


def memo_sizes() -> dict[str, int]:
    """Entries held by each memo of the learn stage, for the metrics."""
    return {"port_sets": _policy_ranges.cache_info().currsize,
            "static_rules": _static_index.cache_info().currsize,
            "final_ranges": _final_ranges.cache_info().currsize}
