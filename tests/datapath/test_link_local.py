"""IPv6 neighbour discovery from link-local and unspecified sources passes an enforced interface;
nothing else from those addresses does (BPF_PROG_TEST_RUN, root)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from fqdnproxy.datapath import bpfsys, egress
from fqdnproxy.datapath.maps import EndpointFlags, Reason

pytestmark = pytest.mark.root

OK, SHOT = 0, 2
LOOPBACK = 1  # BPF_PROG_TEST_RUN runs the program as if the packet came in on lo


def _frame(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    ether = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x86\xdd"
    ip6 = struct.pack("!IHBB", 6 << 28, len(payload), next_header, 255)
    ip6 += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return ether + ip6 + payload


def _icmp6(kind: int) -> bytes:
    return struct.pack("!BBHI", kind, 0, 0, 0) + bytes(16)  # checksum unchecked by the program


def _udp(port: int) -> bytes:
    return struct.pack("!HHHH", 40000, port, 16, 0) + b"payload!"


@pytest.fixture
def dp(pin_dir: Path, bpffs: Path) -> egress.EgressDatapath:
    with egress.EgressDatapath.load(pin_dir, egress.Options(), bpffs=bpffs) as loaded:
        # The endpoint owns "lo" here: unknown sources on it are spoofing.
        loaded.set_endpoint("2001:db8:1::10", 7, EndpointFlags.ENFORCE_EGRESS, LOOPBACK)
        yield loaded


@pytest.mark.parametrize("src, payload, next_header, verdict", [
    ("fe80::1", _icmp6(135), 58, OK),  # neighbour solicitation
    ("fe80::1", _icmp6(133), 58, OK),  # router solicitation
    ("::", _icmp6(135), 58, OK),  # duplicate address detection
    ("fe80::1", _icmp6(143), 58, OK),  # MLDv2 report
    ("fe80::1", _icmp6(128), 58, SHOT),  # echo request: not control traffic
    ("fe80::1", _udp(53), 17, SHOT),  # anything else from link-local
    ("2001:db8:9::9", _icmp6(135), 58, SHOT),  # a global address nobody owns: spoofed
])
def test_link_local_control_traffic(dp: egress.EgressDatapath, src: str, payload: bytes,
                                    next_header: int, verdict: int) -> None:
    frame = _frame(src, "ff02::1:ff00:1", next_header, payload)
    assert bpfsys.prog_test_run(dp.prog_fd, frame, 1)[0] == verdict
    counts = dp.counters()[7]
    reason = Reason.PASS_ICMP_CONTROL if verdict == OK else Reason.DROP_SPOOFED
    assert counts[reason] == 1
