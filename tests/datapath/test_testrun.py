"""Root tests of verdicts through BPF_PROG_TEST_RUN (no namespaces): the fast-path choices.

A SYN is judged before `ct` yet a recorded flow's SYN still passes after expiry; expiry near
"now" is exact although the hot path reads the coarse clock; `ct` hits need equal addresses;
counters live in per-endpoint slots that survive removal and are zeroed on reuse.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.bench_datapath import TCP_ACK, TCP_SYN, packet
from fqdnproxy.datapath import bpfsys, egress, pinned
from fqdnproxy.datapath.allowmap import AllowEntry, PortRange, kernel_now_ns
from fqdnproxy.datapath.maps import EndpointFlags, Reason

pytestmark = pytest.mark.root

OK, SHOT = 0, 2
SRC, SRC6 = "192.0.2.10", "2001:db8:1::10"
DST, DST6 = "203.0.113.5", "2001:db8:ff::5"


@pytest.fixture
def dp(pin_dir: Path, bpffs: Path) -> egress.EgressDatapath:
    with egress.EgressDatapath.load(pin_dir, egress.Options(), bpffs=bpffs) as loaded:
        for ip in (SRC, SRC6):
            loaded.set_endpoint(ip, 7, EndpointFlags.ENFORCE_EGRESS)
        yield loaded


def run(dp: egress.EgressDatapath, frame: bytes) -> int:
    return bpfsys.prog_test_run(dp.prog_fd, frame, 1)[0]


@pytest.mark.parametrize(("src", "dst"), [(SRC, DST), (SRC6, DST6)])
def test_syn_first_then_ct_keeps_the_verdict(dp: egress.EgressDatapath, src: str, dst: str) -> None:
    tcp443 = (PortRange(6, 443, 443),)
    dp.upsert_allows([AllowEntry(7, dst, kernel_now_ns() + 10**9, tcp443)])
    assert run(dp, packet(src, dst, 443)) == OK
    assert len(dp.maps.flows()) == 1
    dp.delete_allows([AllowEntry(7, dst, 0, tcp443).key])
    assert run(dp, packet(src, dst, 443, tcp_flags=TCP_ACK)) == OK  # established
    assert run(dp, packet(src, dst, 443, tcp_flags=TCP_SYN)) == OK  # a SYN retransmit: ct after judge
    assert run(dp, packet(src, dst, 444)) == SHOT  # another port: no flow, no entry
    counts = dp.counters()[7]
    assert counts[Reason.PASS_ESTABLISHED] == 2 and counts[Reason.PASS_ALLOWED] == 1


@pytest.mark.parametrize(("src", "dst", "cidr", "unspecified"), [
    (SRC, DST, "203.0.113.0/24", "0.0.0.0"), (SRC6, DST6, "2001:db8:ff::/48", "::")])
def test_trie_and_dns_keys_match_userspace(dp: egress.EgressDatapath, src: str, dst: str, cidr: str,
                                           unspecified: str) -> None:
    """The program composes its keys word by word ("map keys" in the C): each must find its entry."""
    assert run(dp, packet(src, dst, 53, "udp")) == SHOT
    dp.set_dns_target(dst, 53)
    assert [run(dp, packet(src, dst, 53, proto)) for proto in ("udp", "tcp")] == [OK, OK]
    assert run(dp, packet(src, dst, 54, "udp")) == SHOT  # the port is part of the key
    dp.set_dns_target(unspecified, 5353)  # any server on 5353 (transparent mode)
    assert [run(dp, packet(src, dst, port, "udp")) for port in (5353, 5354)] == [OK, SHOT]
    dp.upsert_allows([AllowEntry(7, cidr, 0, (PortRange(17, 9999, 9999),))])  # the trie
    assert [run(dp, packet(src, dst, port, "udp")) for port in (9999, 9998)] == [OK, SHOT]
    counts = dp.counters()[7]
    assert counts[Reason.PASS_DNS] == 3 and counts[Reason.PASS_ALLOWED] == 1


def test_ct_hit_needs_equal_addresses(dp: egress.EgressDatapath) -> None:
    dp.upsert_allows([AllowEntry(7, DST, 0, (PortRange(6, 443, 443),))])
    assert run(dp, packet(SRC, DST, 443)) == OK
    [(key, value)] = dp.maps.flows()
    # Forge the stored destination: the key (and its address hash) still matches, the check not.
    value.daddr[15] ^= 1
    bpfsys.update(dp.maps._fds["ct"], key, value)
    dp.delete_allows([AllowEntry(7, DST, 0).key])
    assert run(dp, packet(SRC, DST, 443, tcp_flags=TCP_ACK)) == SHOT
    value.daddr[15] ^= 1
    bpfsys.update(dp.maps._fds["ct"], key, value)
    assert run(dp, packet(SRC, DST, 443, tcp_flags=TCP_ACK)) == OK


def test_expiry_is_exact_despite_the_coarse_clock(dp: egress.EgressDatapath) -> None:
    expiry = kernel_now_ns() + 30_000_000  # 30 ms: within the coarse clock's slack
    dp.upsert_allows([AllowEntry(7, DST, expiry, (PortRange(6, 443, 443),))])
    assert run(dp, packet(SRC, DST, 443)) == OK
    pinned.clear_flows(dp.maps)  # else the recorded flow passes the next SYN
    while kernel_now_ns() < expiry:
        time.sleep(0.002)
    assert run(dp, packet(SRC, DST, 443)) == SHOT  # a tick may not have passed: precise clock
    assert dp.counters()[7][Reason.DROP_EXPIRED] == 1


def test_counter_slots(dp: egress.EgressDatapath) -> None:
    assert run(dp, packet(SRC, DST, 443)) == SHOT
    assert dp.counters()[7][Reason.DROP_NO_ENTRY] == 1
    slot = next(v.slot for _, v in dp.maps.endpoints())
    assert {v.slot for _, v in dp.maps.endpoints()} == {slot}  # one slot per endpoint id
    dp.remove_endpoint(SRC)
    dp.remove_endpoint(SRC6)
    assert dp.counters()[7][Reason.DROP_NO_ENTRY] == 1  # retired: the counts stay
    dp.set_endpoint(SRC, 7, EndpointFlags.ENFORCE_EGRESS)  # same id: same slot, counts go on
    assert next(v.slot for _, v in dp.maps.endpoints()) == slot
    assert dp.counters()[7][Reason.DROP_NO_ENTRY] == 1
    dp.set_endpoint(SRC, 8, EndpointFlags.NONE)  # the address moves to id 8: 7 retires
    assert run(dp, packet(SRC, DST, 443)) == OK
    counts = dp.counters()
    assert counts[8] == {Reason.PASS_UNENFORCED: 1} and counts[7][Reason.DROP_NO_ENTRY] == 1


def test_a_retired_slot_is_zeroed_for_another_id(pin_dir: Path, bpffs: Path) -> None:
    options = egress.Options(endpoints_max=2)
    with egress.EgressDatapath.load(pin_dir, options, bpffs=bpffs) as dp:
        dp.set_endpoint(SRC, 1, EndpointFlags.ENFORCE_EGRESS)
        dp.set_endpoint(SRC6, 2, EndpointFlags.ENFORCE_EGRESS)
        assert run(dp, packet(SRC, DST, 443)) == SHOT
        dp.remove_endpoint(SRC)
        dp.set_endpoint("192.0.2.11", 3, EndpointFlags.NONE)  # no free slot: takes 1's
        assert 1 not in dp.counters()
        assert run(dp, packet("192.0.2.11", DST, 443)) == OK
        assert dp.counters()[3] == {Reason.PASS_UNENFORCED: 1}
        with pytest.raises(bpfsys.BpfError):
            dp.set_endpoint("192.0.2.12", 4, EndpointFlags.NONE)  # both slots in use


def test_an_address_any_dns_worker_learned_admits(pin_dir: Path, bpffs: Path) -> None:
    """With dns.workers 3 the program reads three exact maps, one per worker process: an entry
    in any of them admits the flow, and a refusal names the most telling reason among them (a
    known address on another port, PORT, over an expired one)."""
    tcp443, tcp80 = (PortRange(6, 443, 443),), (PortRange(6, 80, 80),)
    other = "203.0.113.6"
    options = egress.Options(workers=3, record_flows=False)  # every packet judged afresh
    with egress.EgressDatapath.load(pin_dir, options, bpffs=bpffs) as dp:
        dp.set_endpoint(SRC, 7, EndpointFlags.ENFORCE_EGRESS)
        assert sorted(p.name for p in pin_dir.glob("allow_exact*")) == [
            "allow_exact", "allow_exact_1", "allow_exact_2"]
        with pinned.PinnedMaps.open(pin_dir, 1) as worker1, \
                pinned.PinnedMaps.open(pin_dir, 2) as worker2:
            now = kernel_now_ns()
            worker2.upsert_allows([AllowEntry(7, DST, now + 10**10, tcp443)])
            assert dp.lookup(AllowEntry(7, DST, 0).key) is None  # not in worker 0's map
            assert run(dp, packet(SRC, DST, 443)) == OK
            assert run(dp, packet(SRC, DST, 444)) == SHOT
            worker1.upsert_allows([AllowEntry(7, other, now - 1, tcp443)])  # expired
            assert run(dp, packet(SRC, other, 443)) == SHOT
            worker2.upsert_allows([AllowEntry(7, other, now + 10**10, tcp80)])
            assert run(dp, packet(SRC, other, 443)) == SHOT
            assert run(dp, packet(SRC, other, 80)) == OK
            assert worker2.dump() == [AllowEntry(7, DST, now + 10**10, tcp443),
                                      AllowEntry(7, other, now + 10**10, tcp80)]
        counts = dp.counters()[7]
        assert counts[Reason.PASS_ALLOWED] == 2
        assert (counts[Reason.DROP_PORT], counts[Reason.DROP_EXPIRED]) == (2, 1)
        with pytest.raises(pinned.NotPinned, match="fewer than 4 DNS workers"):
            pinned.PinnedMaps.open(pin_dir, 3)
    # An agent started with one worker fewer unpins the map the program no longer reads.
    assert pinned.unpin_worker_maps(pin_dir, 2) == ["allow_exact_2"]
    assert not (pin_dir / "allow_exact_2").exists() and (pin_dir / "allow_exact_1").exists()
