"""The pinned maps of one pin directory: open, check the layout, read and write them.

Works without bcc and without the program: ``fqdnproxy map dump`` and the agent's GC thread use
it directly, and ``egress.EgressDatapath`` uses it after bcc created or reused the pins. Every
map is opened by path, so several processes (an agent and a dump) see the same kernel maps.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from fqdnproxy.datapath import bpfsys, maps
from fqdnproxy.datapath.allowmap import (
    V6_KEY, AllowEntry, AllowKey, Address, HostAllows, PortRange)
from fqdnproxy.errors import FqdnproxyError

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/fqdnproxy")
BATCH = 8192  # entries per bpf() call: bounded memory, few syscalls
_NO_BATCH = {errno.EINVAL, errno.ENOTSUP, 524}  # 524: the kernel's ENOTSUPP


class LayoutMismatch(FqdnproxyError):
    """The pinned maps were made by another fqdnproxy version; the message says what to do."""

    def __init__(self, pin_dir: Path, problems: Sequence[str]) -> None:
        super().__init__(
            f"pinned maps in {pin_dir} do not match this build's layout (version "
            f"{maps.LAYOUT_VERSION}): {'; '.join(problems)}. There is no in-place migration "
            f"between layouts: stop the agent, delete the directory (`rm -r {pin_dir}`) and start "
            "it. The new agent creates the maps and replaces the attached program; what was "
            "learned is lost, so each pod's new connections wait for its next DNS lookup"
        )
        self.pin_dir = pin_dir
        self.problems = tuple(problems)


class NotPinned(FqdnproxyError):
    """No fqdnproxy maps are pinned there; is the agent running with this --pin-dir?"""


def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has (the kernel's possible CPUs)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def check_layout(pin_dir: Path) -> bool:
    """Check what is pinned in ``pin_dir`` against this build; return True if maps exist.

    Raises:
        LayoutMismatch: a map's key or value size, or the stored layout version, differs.
    """
    problems = []
    found = False
    for name in (*maps.PINNED_MAPS, *maps.WORKER_EXACT_MAPS):
        path = pin_dir / name
        if not path.exists():
            continue
        found = True
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(fd)
            want = maps.MAP_SIZES[name]
            if name == "counters":
                want = (want[0], info.value_size)  # the kernel reports the per-CPU slot size
            if (info.key_size, info.value_size) != want:
                problems.append(
                    f"map {name} has key/value sizes {info.key_size}/{info.value_size}, "
                    f"expected {want[0]}/{want[1]}"
                )
            if name == "meta" and not problems:
                value = maps.MetaValue()
                bpfsys.lookup(fd, ctypes.c_uint32(0), value)
                if value.layout_version not in (0, maps.LAYOUT_VERSION):
                    problems.append(f"stored layout version is {value.layout_version}")
        finally:
            os.close(fd)
    if problems:
        raise LayoutMismatch(pin_dir, problems)
    return found


def unpin_worker_maps(pin_dir: Path, workers: int) -> list[str]:
    """Unpin the exact maps of DNS workers ``workers`` and beyond; return their names.

    An agent that ran more workers left them: a program compiled for ``workers`` never reads
    them (a program still attached keeps its own references until it is replaced), and were
    they left pinned, a later agent with more workers would find their stale entries.
    """
    removed = []
    for name in maps.WORKER_EXACT_MAPS[max(workers - 1, 0):]:
        path = pin_dir / name
        if path.exists():
            path.unlink()
            removed.append(name)
    return removed


def dump_every_worker(pin_dir: Path) -> list[AllowEntry]:
    """``PinnedMaps.dump`` over the exact maps of every DNS worker pinned in ``pin_dir``, the
    trie once: what the program judges by (an address two workers learned is listed twice)."""
    with PinnedMaps.open(pin_dir) as primary:
        entries = primary.dump()
    for index in range(1, maps.MAX_WORKERS):
        if (pin_dir / maps.exact_map(index)).exists():
            with PinnedMaps.open(pin_dir, index) as worker:
                entries += [entry for entry in worker.dump() if entry.key.exact]
    return sorted(entries, key=lambda e: e.key.sort_key)


def size_differences(pin_dir: Path, wanted: dict[str, int]) -> list[tuple[str, int, int]]:
    """(map, wanted, pinned) for each map of ``wanted`` pinned in ``pin_dir`` with another
    ``max_entries``; maps not pinned yet are left out."""
    out = []
    for name, want in wanted.items():
        path = pin_dir / name
        if not path.exists():
            continue
        fd = bpfsys.obj_get(path)
        try:
            actual = bpfsys.map_info(fd).max_entries
        finally:
            os.close(fd)
        if actual != want:
            out.append((name, want, actual))
    return out


# The learn stage writes every new IP through this, so it packs with precompiled structs, packs
# each distinct value once (the entries of one answer share their expiry and port set) and hands
# the bytes to the kernel as they are.
_EXACT_HEAD = struct.Struct("<I")  # endpoint id; the 16 address bytes follow
_VALUE_HEAD = struct.Struct("<QII")  # expiry, number of ranges, pad
_RANGE = struct.Struct("<HHB3x")  # first, last, protocol
_RANGES_SIZE = _RANGE.size * maps.MAX_PORT_RANGES
_EXACT_KEY_SIZE = ctypes.sizeof(maps.ExactKey)
_V4_TAIL = struct.Struct(">I")  # an IPv4 address's 4 bytes, from its integer value
_BE32S = tuple(struct.Struct(f">{count}I") for count in range(65))  # an answer's IPv4 addresses
_VALUE_SIZE = ctypes.sizeof(maps.AllowValue)


def _pack_value(entry: AllowEntry) -> bytes:
    """``bytes(maps.encode_value(entry))``, with structs."""
    return _VALUE_HEAD.pack(entry.expiry_ns, len(entry.ports), 0) + _pack_ranges(entry.ports)


def _pack_ranges(ports: Sequence[PortRange]) -> bytes:
    """A value's port ranges, padded to ``MAX_PORT_RANGES``."""
    return b"".join([_RANGE.pack(r.first, r.last, r.protocol) for r in ports]
                    ).ljust(_RANGES_SIZE, b"\x00")


def _pack_exact(entries: Sequence[AllowEntry]) -> tuple[bytes, bytes, list[AllowEntry]]:
    """(keys, values) of the /32 and /128 among ``entries``, packed for ``allow_exact`` in
    order, and the other entries (prefixes, for the trie).

    The keys and values are what ``maps.encode_key`` and ``maps.encode_value`` give.
    """
    keys: list[bytes] = []
    values: list[bytes] = []
    trie: list[AllowEntry] = []
    heads: dict[int, tuple[bytes, bytes]] = {}  # endpoint id -> (its v4 key head, its v6 head)
    last_id = -1
    head4 = head6 = b""
    last_expiry = -1
    last_ports: object = None
    value = b""
    v4_address = ipaddress.IPv4Address
    for e in entries:
        net = e.network
        address = net.network_address
        v4 = type(address) is v4_address
        if net.prefixlen != (32 if v4 else 128):
            trie.append(e)
            continue
        if e.endpoint_id != last_id:
            last_id = e.endpoint_id
            found = heads.get(last_id)
            if found is None:
                head6 = _EXACT_HEAD.pack(last_id)
                found = heads[last_id] = (head6 + maps.V4_MAPPED, head6)
            head4, head6 = found
        keys.append((head4 if v4 else head6) + address.packed)
        if e.expiry_ns != last_expiry or e.ports is not last_ports:
            last_expiry, last_ports = e.expiry_ns, e.ports
            value = _pack_value(e)
        values.append(value)
    return b"".join(keys), b"".join(values), trie


def _pack_v4_keys(head4: bytes, addresses: list[int]) -> bytes:
    """``allow_exact`` keys of IPv4 ``addresses`` (integers) behind one key head (endpoint id
    and the IPv4-mapped prefix): the heads repeated, then each address byte put in place across
    all keys by one slice assignment (the addresses packed big-endian in one call)."""
    count = len(addresses)
    size = _EXACT_KEY_SIZE
    packed = (_BE32S[count] if count < len(_BE32S) else struct.Struct(f">{count}I")).pack(
        *addresses)
    keys = bytearray((head4 + bytes(4)) * count)
    for byte in range(4):
        keys[size - 4 + byte::size] = packed[byte::4]
    return bytes(keys)


def _pack_hosts(batch: HostAllows) -> tuple[bytes, bytes]:
    """(keys, values) of ``batch`` packed for ``allow_exact``: what ``_pack_exact`` gives for
    ``batch.entries()``, from the integer keys, and the value packed once per distinct expiry
    (an answer's IPs mostly share one)."""
    head6 = _EXACT_HEAD.pack(batch.endpoint_id)
    head4 = head6 + maps.V4_MAPPED
    ips = batch.keys
    if max(ips) < V6_KEY:  # IPv4 only, an A answer: no Python loop per address
        keys = _pack_v4_keys(head4, ips)
    else:
        tail4 = _V4_TAIL.pack
        keys = b"".join([head4 + tail4(k) if k < V6_KEY else head6 + (k - V6_KEY).to_bytes(16, "big")
                         for k in ips])
    ports = batch.ports
    ranges = _pack_ranges(ports)
    expiries = batch.expiries
    if expiries.count(expiries[0]) == len(expiries):
        values = (_VALUE_HEAD.pack(expiries[0], len(ports), 0) + ranges) * len(expiries)
    else:
        packed: dict[int, bytes] = {}
        head = _VALUE_HEAD.pack
        values = b"".join([packed.get(x) or packed.setdefault(x, head(x, len(ports), 0) + ranges)
                           for x in expiries])
    return keys, values


class PinnedMaps:
    """File descriptors of the maps pinned in one directory, with typed operations."""

    def __init__(self, pin_dir: Path, fds: dict[str, int], worker: int = 0) -> None:
        self.pin_dir = pin_dir
        self._fds = fds
        self._ncpus = possible_cpus()
        # The exact map this process writes, reads and collects: its DNS worker's (maps.py).
        self._exact = maps.exact_map(worker)

    @classmethod
    def open(cls, pin_dir: str | Path = DEFAULT_PIN_DIR, worker: int = 0) -> PinnedMaps:
        """Open the maps pinned in ``pin_dir`` after checking their layout; the exact allow map
        is DNS worker ``worker``'s (``maps.exact_map``).

        Raises:
            NotPinned: nothing is pinned there, or not the worker's exact map (the program was
                compiled for fewer workers).
            LayoutMismatch: the pins come from another layout version.
        """
        pin_dir = Path(pin_dir)
        if not check_layout(pin_dir):
            raise NotPinned(f"no fqdnproxy maps are pinned in {pin_dir}")
        exact = maps.exact_map(worker)
        if not (pin_dir / exact).exists():
            raise NotPinned(f"no {exact} is pinned in {pin_dir}: the program attached was "
                            f"compiled for fewer than {worker + 1} DNS workers")
        fds = {}
        try:
            for name in dict.fromkeys((*maps.PINNED_MAPS, exact)):
                fds[name] = bpfsys.obj_get(pin_dir / name)
        except bpfsys.BpfError:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(pin_dir, fds, worker)

    def close(self) -> None:
        """Close the fds (the maps stay pinned)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- layout version ----------------------------------------------------------------------

    def layout_version(self) -> int:
        """The layout version stored with the maps (0 until the first load writes it)."""
        value = maps.MetaValue()
        bpfsys.lookup(self._fds["meta"], ctypes.c_uint32(0), value)
        return value.layout_version

    def stamp_layout(self) -> None:
        """Store this build's layout version with the maps."""
        bpfsys.update(self._fds["meta"], ctypes.c_uint32(0),
                      maps.MetaValue(layout_version=maps.LAYOUT_VERSION))

    # --- endpoints ----------------------------------------------------------------------------

    def set_endpoint(self, ip: str | Address, endpoint_id: int, flags: int, ifindex: int = 0) -> None:
        """Make source ``ip`` endpoint ``endpoint_id`` with ``flags`` (EndpointFlags).

        A non-zero ``ifindex`` (the host-side interface, in the namespace the program is attached
        in) turns on anti-spoofing: from then on, packets from ``ip`` on other interfaces and
        packets on ``ifindex`` from unknown sources are dropped when ENFORCE_EGRESS is set.
        """
        address = ipaddress.ip_address(ip)
        key = maps.endpoint_key(address)
        old = maps.EndpointValue()
        had = bpfsys.lookup(self._fds["endpoints"], key, old)
        slot = old.slot if had and old.endpoint_id == endpoint_id else self._claim_slot(endpoint_id)
        value = maps.EndpointValue(endpoint_id=endpoint_id, flags=int(flags), ifindex=ifindex, slot=slot)
        if ifindex:
            bpfsys.update(self._fds["ifaces"], ctypes.c_uint32(ifindex),
                          maps.IfaceValue(endpoint_id=endpoint_id, flags=int(flags), slot=slot))
        bpfsys.update(self._fds["endpoints"], key, value)
        if had and old.endpoint_id != endpoint_id:
            self._release_slot(old.endpoint_id, old.slot)

    def remove_endpoint(self, ip: str | Address) -> bool:
        """Forget source ``ip``; its interface is released when no other address uses it."""
        address = ipaddress.ip_address(ip)
        key = maps.endpoint_key(address)
        value = maps.EndpointValue()
        if not bpfsys.lookup(self._fds["endpoints"], key, value):
            return False
        bpfsys.delete(self._fds["endpoints"], key)
        if value.ifindex and not any(v.ifindex == value.ifindex for _, v in self.endpoints()):
            bpfsys.delete(self._fds["ifaces"], ctypes.c_uint32(value.ifindex))
        self._release_slot(value.endpoint_id, value.slot)
        return True

    # --- counters slots ----------------------------------------------------------------------
    # The program counts into a per-CPU array at slot * REASON_MAX + reason; each endpoint id that
    # has an address in `endpoints` owns one slot, recorded in `slots`. One writer (the agent)
    # at a time, like every other map write here.

    def _slot_owners(self) -> Iterator[tuple[int, maps.SlotValue]]:
        for slot, value in self._iterate("slots", ctypes.c_uint32, maps.SlotValue):
            yield int(slot), maps.SlotValue.from_buffer_copy(value)

    def _claim_slot(self, endpoint_id: int) -> int:
        """The slot of ``endpoint_id``: its own (in use or retired), else a free one, else the
        first retired one of another id; a slot changing hands has its counters zeroed."""
        free = retired = None
        for slot, owner in self._slot_owners():
            if owner.state != maps.SlotState.FREE and owner.endpoint_id == endpoint_id:
                if owner.state != maps.SlotState.USED:
                    self._set_slot(slot, endpoint_id, maps.SlotState.USED)
                return slot
            if owner.state == maps.SlotState.FREE and free is None:
                free = slot
            elif owner.state == maps.SlotState.RETIRED and retired is None:
                retired = slot
        slot = free if free is not None else retired
        if slot is None:
            raise bpfsys.BpfError("no free counters slot (every endpoints slot is in use)", errno.ENOSPC)
        zero = (ctypes.c_uint64 * self._ncpus)()
        for reason in range(maps.REASON_MAX):
            bpfsys.update(self._fds["counters"], ctypes.c_uint32(slot * maps.REASON_MAX + reason), zero)
        self._set_slot(slot, endpoint_id, maps.SlotState.USED)
        return slot

    def _set_slot(self, slot: int, endpoint_id: int, state: maps.SlotState) -> None:
        bpfsys.update(self._fds["slots"], ctypes.c_uint32(slot),
                      maps.SlotValue(endpoint_id=endpoint_id, state=state))

    def _release_slot(self, endpoint_id: int, slot: int) -> None:
        """Retire ``slot`` when no address of ``endpoint_id`` is left (its counts stay)."""
        if any(v.endpoint_id == endpoint_id for _, v in self.endpoints()):
            return
        owner = maps.SlotValue()
        if bpfsys.lookup(self._fds["slots"], ctypes.c_uint32(slot), owner) and \
                owner.endpoint_id == endpoint_id and owner.state == maps.SlotState.USED:
            self._set_slot(slot, endpoint_id, maps.SlotState.RETIRED)

    def endpoints(self) -> list[tuple[Address, maps.EndpointValue]]:
        """Every (source address, endpoint value)."""
        return [(maps.unpack_addr(bytes(k.addr), k.family), v)
                for k, v in self._iterate("endpoints", maps.EndpointKey, maps.EndpointValue)]

    # --- DNS targets --------------------------------------------------------------------------

    def set_dns_target(self, ip: str | Address, port: int = 53, protocols: Sequence[int] = (6, 17)) -> None:
        """Let enforced endpoints always reach the DNS proxy at ``ip``:``port``."""
        for proto in protocols:
            bpfsys.update(self._fds["dns_targets"],
                          maps.dns_key(ipaddress.ip_address(ip), port, proto), ctypes.c_uint32(1))

    def remove_dns_target(self, ip: str | Address, port: int = 53, protocols: Sequence[int] = (6, 17)) -> None:
        """Undo ``set_dns_target``."""
        for proto in protocols:
            bpfsys.delete(self._fds["dns_targets"], maps.dns_key(ipaddress.ip_address(ip), port, proto))

    # --- allow entries -------------------------------------------------------------------------

    def upsert_allows(self, entries: Sequence[AllowEntry]) -> None:
        """Insert or replace entries, /32 and /128 into the exact hash, the rest into the trie.

        One BPF_MAP_UPDATE_BATCH per ``BATCH`` entries. Each (endpoint, prefix) holds one entry:
        callers merge the ports of rules for the same prefix (DESIGN.md, merge rule).
        """
        keys, values, trie = _pack_exact(entries)
        self._update_exact(keys, values)
        for entry in trie:  # CIDR rules: few, and the trie's batch support varies by kernel
            bpfsys.update(self._fds["allow"], maps.encode_key(entry.key), maps.encode_value(entry))

    def upsert_hosts(self, batch: HostAllows) -> None:
        """``upsert_allows(batch.entries())``, packed from the integer keys (the learn stage)."""
        if batch.keys:
            self._update_exact(*_pack_hosts(batch))

    def _update_exact(self, keys: bytes, values: bytes) -> None:
        """Write packed ``allow_exact`` keys and values, ``BATCH`` entries per bpf() call."""
        exact = len(keys) // _EXACT_KEY_SIZE
        for start in range(0, exact, BATCH):
            count = min(BATCH, exact - start)
            if count == exact:  # one batch, the learn stage's case: no copies
                chunk_keys, chunk_values = keys, values
            else:
                chunk_keys = keys[start * _EXACT_KEY_SIZE:(start + count) * _EXACT_KEY_SIZE]
                chunk_values = values[start * _VALUE_SIZE:(start + count) * _VALUE_SIZE]
            bpfsys.update_batch(self._fds[self._exact], chunk_keys, chunk_values, count)

    def delete_allows(self, keys: Sequence[AllowKey]) -> int:
        """Delete entries by key; return how many existed."""
        deleted = 0
        for key in keys:
            name = self._exact if key.exact else "allow"
            deleted += bpfsys.delete(self._fds[name], maps.encode_key(key))
        return deleted

    def lookup(self, key: AllowKey) -> AllowEntry | None:
        """Return the entry stored under exactly ``key`` (no prefix matching)."""
        value = maps.AllowValue()
        name = self._exact if key.exact else "allow"
        if not bpfsys.lookup(self._fds[name], maps.encode_key(key), value):
            return None
        return maps.decode_value(key, value)

    def dump(self) -> list[AllowEntry]:
        """Every allow entry of this worker's exact map and of the trie, ordered by endpoint,
        family, address, prefix."""
        out = []
        for name, key_type in ((self._exact, maps.ExactKey), ("allow", maps.AllowKeyC)):
            for raw_key, raw_value in self._iterate(name, key_type, maps.AllowValue):
                key = maps.decode_key(raw_key)
                out.append(maps.decode_value(key, raw_value))
        return sorted(out, key=lambda e: e.key.sort_key)

    def gc(self, now_ns: int, batch: int = BATCH) -> int:
        """Delete up to ``batch`` entries that expired before ``now_ns``; return how many.

        The kernel already refuses expired entries; this only frees their memory. It walks the
        maps with batched lookups, so call it from a worker thread, not the event loop.
        """
        deleted = 0
        for name, key_type in ((self._exact, maps.ExactKey), ("allow", maps.AllowKeyC)):
            doomed = []
            for raw_key, raw_value in self._iterate(name, key_type, maps.AllowValue):
                if raw_value.expiry_ns and raw_value.expiry_ns <= now_ns:
                    doomed.append(key_type.from_buffer_copy(raw_key))
                    if deleted + len(doomed) >= batch:
                        break
            for key in doomed:
                deleted += bpfsys.delete(self._fds[name], key)
            if deleted >= batch:
                break
        return deleted

    # --- counters and flows --------------------------------------------------------------------

    def counters(self) -> dict[int, dict[maps.Reason, int]]:
        """Packets per endpoint and reason, summed over CPUs (endpoint id -> reason -> count).

        Only non-zero counts appear. They outlive the endpoint's addresses until its slot is
        given to another endpoint id (when every slot is taken).
        """
        owners = {slot: o.endpoint_id for slot, o in self._slot_owners() if o.state != maps.SlotState.FREE}
        out: dict[int, dict[maps.Reason, int]] = {}
        fd = self._fds["counters"]
        values = (ctypes.c_uint64 * self._ncpus)()
        for slot, endpoint_id in sorted(owners.items()):
            for reason in maps.Reason:
                if bpfsys.lookup(fd, ctypes.c_uint32(slot * maps.REASON_MAX + reason), values):
                    total = sum(values)
                    if total:
                        out.setdefault(endpoint_id, {})[reason] = total
        return out

    def flows(self) -> list[tuple[maps.CtKey, maps.CtValue]]:
        """Every recorded flow (``ct``)."""
        return list(self._iterate("ct", maps.CtKey, maps.CtValue))

    # --- iteration -----------------------------------------------------------------------------

    def _keys(self, fd: int, key_type: type[ctypes.Structure]) -> list[ctypes.Structure]:
        keys = []
        key = None
        while True:
            nxt = key_type()
            if not bpfsys.next_key(fd, key, nxt):
                return keys
            keys.append(nxt)
            key = nxt

    def _iterate(self, name: str, key_type: type, value_type: type) -> Iterator[tuple]:
        """Yield (key, value) pairs, by BPF_MAP_LOOKUP_BATCH where the map supports it."""
        fd = self._fds[name]
        try:
            yield from self._iterate_batched(fd, key_type, value_type)
            return
        except bpfsys.BpfError as exc:
            if exc.errno not in _NO_BATCH:
                raise
        value = value_type()
        for key in self._keys(fd, key_type):
            if bpfsys.lookup(fd, key, value):
                yield key, value_type.from_buffer_copy(value)

    @staticmethod
    def _iterate_batched(fd: int, key_type: type, value_type: type) -> Iterator[tuple]:
        count = 4096
        keys = (key_type * count)()
        values = (value_type * count)()
        token_in = ctypes.create_string_buffer(max(ctypes.sizeof(key_type), 8))
        token_out = ctypes.create_string_buffer(max(ctypes.sizeof(key_type), 8))
        first = True
        while True:
            n, done = bpfsys.lookup_batch(fd, None if first else token_in, token_out, keys, values, count)
            for i in range(n):
                yield keys[i], values[i]
            if done:
                return
            first = False
            ctypes.memmove(token_in, token_out, len(token_out))


def _clear(maps_: PinnedMaps, name: str, key_type: type) -> int:
    fd = maps_._fds[name]
    keys = maps_._keys(fd, key_type)
    return sum(bpfsys.delete(fd, k) for k in keys)


def clear_flows(maps_: PinnedMaps) -> int:
    """Forget every recorded flow (established flows then need a new allow hit)."""
    return _clear(maps_, "ct", maps.CtKey)
