"""The static rules of one endpoint policy as integer prefix tables: which of them cover an address.

A learned /32 or /128 inside a static CIDR (or entity, or endpoint) rule must carry that rule's
ports, and lose those of every static deny covering it, because the kernel stops at the longest
match (learner.py, step 3). The learn stage asks this for every new IP, so it must not cost a loop
over ``ipaddress`` networks (about a microsecond each, per rule, per IP): here each family's
networks are grouped by prefix length into dicts keyed by the network's leading bits, so covering
an address is one shift and one dict lookup per distinct prefix length, whatever the number of
rules, and a family without rules costs nothing.

Pure: addresses are integers (``int.from_bytes`` of the packed address), no kernel, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from fqdnproxy.datapath.allowmap import PortRange
from fqdnproxy.ipkey import V6

Ranges = tuple[PortRange, ...]
BITS = {4: 32, 6: 128}


class StaticIndex:
    """What the static ``allows`` and ``denies`` of a policy say about one address.

    ``ranges_of`` turns a rule's policy ports into datapath ranges; it is called once per rule,
    when the index is built.
    """

    def __init__(self, allows: Sequence[object], denies: Sequence[object],
                 ranges_of: Callable[[object], Ranges]) -> None:
        # rule slot -> (is a deny, its ranges); slots keep the rules' order, allows first
        self._rules: list[tuple[bool, Ranges]] = []
        # family -> rule slot -> (shift, leading bits) of each except
        self._excepts: dict[int, dict[int, list[tuple[int, int]]]] = {4: {}, 6: {}}
        tables: dict[int, dict[int, dict[int, list[int]]]] = {4: {}, 6: {}}
        for deny, rules in ((False, allows), (True, denies)):
            for rule in rules:
                slot = len(self._rules)
                self._rules.append((deny, ranges_of(rule.ports)))  # type: ignore[attr-defined]
                for network in rule.networks:  # type: ignore[attr-defined]
                    shift, key = _prefix(network)
                    held = tables[network.version].setdefault(shift, {}).setdefault(key, [])
                    if slot not in held:
                        held.append(slot)
                for network in rule.excepts:  # type: ignore[attr-defined]
                    self._excepts[network.version].setdefault(slot, []).append(_prefix(network))
        # family -> [(shift, leading bits -> rule slots)], longest prefixes first
        self._tables = {family: sorted(by_shift.items()) for family, by_shift in tables.items()}

    def covered_keys(self, ip_keys: Iterable[int]) -> set[int]:
        """Those of ``ip_keys`` (``ipkey`` keys) that some rule, allow or deny, covers.

        Excepts are not applied: a key returned may in the end be covered by nothing, so this
        is for sorting out the keys that need ``cover`` from those that certainly do not. One
        set comprehension per distinct prefix length of each family with rules; nothing for a
        family without rules.
        """
        covered: set[int] = set()
        v4, v6 = self._tables[4], self._tables[6]
        if v4:
            for shift, table in v4:
                covered.update([k for k in ip_keys if k < V6 and k >> shift in table])
        if v6:
            for shift, table in v6:
                covered.update([k for k in ip_keys if k >= V6 and (k - V6) >> shift in table])
        return covered

    def cover(self, family: int, address: int) -> tuple[Ranges, Ranges, bool]:
        """(ranges the allows covering ``address`` add, ranges its denies take away, whether a
        covering rule names exactly this address) for ``address`` of ``family`` (4 or 6)."""
        tables = self._tables[family]
        if not tables:
            return (), (), False
        hits: dict[int, bool] = {}  # rule slot -> names exactly this address
        for shift, table in tables:
            slots = table.get(address >> shift)
            if slots:
                for slot in slots:
                    hits[slot] = hits.get(slot, False) or shift == 0
        if not hits:
            return (), (), False
        excepts = self._excepts[family]
        allowed: Ranges = ()
        denied: Ranges = ()
        exact = False
        for slot in sorted(hits):
            if any(address >> shift == key for shift, key in excepts.get(slot, ())):
                continue
            deny, ranges = self._rules[slot]
            if deny:
                denied += ranges
            else:
                allowed += ranges
            exact = exact or hits[slot]
        return allowed, denied, exact


def _prefix(network: object) -> tuple[int, int]:
    """(bits to shift an address right, the network's leading bits) of an ipaddress network."""
    shift = BITS[network.version] - network.prefixlen  # type: ignore[attr-defined]
    return shift, int(network.network_address) >> shift  # type: ignore[attr-defined]
