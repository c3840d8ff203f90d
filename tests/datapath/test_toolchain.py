"""The BPF toolchain: header discovery (pure) and a real tc program that traffic crosses (root)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS

from fqdnproxy.datapath import toolchain
from tests.conftest import require
from tests.support import netns

# --- header discovery: table-driven, on fake trees -------------------------------------------


def _tree(root: Path, *, autoconf: bool = True, kconfig: bool = True) -> Path:
    if autoconf:
        (root / "include/generated").mkdir(parents=True)
        (root / "include/generated/autoconf.h").write_text("")
    if kconfig:
        (root / "include/linux").mkdir(parents=True)
        (root / "include/linux/kconfig.h").write_text("")
    root.mkdir(parents=True, exist_ok=True)
    return root


def test_explicit_env_wins(tmp_path: Path) -> None:
    explicit = _tree(tmp_path / "explicit")
    _tree(tmp_path / "modules/6.18.0/build")
    found = toolchain.find_kernel_headers(
        environ={"BCC_KERNEL_SOURCE": str(explicit)},
        release="6.18.0",
        shim_root=tmp_path / "shim",
        modules_root=tmp_path / "modules",
    )
    assert found == explicit


def test_explicit_env_must_be_a_merged_tree(tmp_path: Path) -> None:
    # The -amd64 tree alone has autoconf.h but not kconfig.h: bcc fails on it, so do we.
    half = _tree(tmp_path / "amd64-only", kconfig=False)
    with pytest.raises(toolchain.ToolchainError, match="BCC_KERNEL_SOURCE"):
        toolchain.find_kernel_headers(
            environ={"BCC_KERNEL_SOURCE": str(half)},
            release="6.18.0",
            shim_root=tmp_path / "shim",
            modules_root=tmp_path / "modules",
        )


def test_modules_build_before_shim(tmp_path: Path) -> None:
    build = _tree(tmp_path / "modules/6.18.0/build", kconfig=False)  # bcc adds source/ itself
    _tree(tmp_path / "shim/6.18.0")
    found = toolchain.find_kernel_headers(
        environ={}, release="6.18.0", shim_root=tmp_path / "shim", modules_root=tmp_path / "modules"
    )
    assert found == build


def test_shim_for_this_release_only(tmp_path: Path) -> None:
    shim = _tree(tmp_path / "shim/6.18.0")
    found = toolchain.find_kernel_headers(
        environ={}, release="6.18.0", shim_root=tmp_path / "shim", modules_root=tmp_path / "modules"
    )
    assert found == shim
    with pytest.raises(toolchain.ToolchainError, match="make bootstrap"):
        toolchain.find_kernel_headers(
            environ={}, release="6.19.0", shim_root=tmp_path / "shim", modules_root=tmp_path / "modules"
        )


def test_toolchain_error_is_an_fqdnproxy_error() -> None:
    from fqdnproxy.errors import FqdnproxyError

    assert issubclass(toolchain.ToolchainError, FqdnproxyError)
    assert "make bootstrap" in str(toolchain.ToolchainError())


# --- a real tc program on a real veth --------------------------------------------------------

PROBE_PORT = 39999
COUNTER_SRC = r"""
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/udp.h>

enum counter { C_ALL = 0, C_UDP4_PROBE = 1, C_UDP6_PROBE = 2, C_MAX = 3 };
BPF_PERCPU_ARRAY(counters, u64, C_MAX);

static __always_inline void bump(int key)
{
    u64 *value = counters.lookup(&key);
    if (value)
        *value += 1;
}

int count_ingress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    bump(C_ALL);
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP || ip->ihl != 5)
            return TC_ACT_OK;
        struct udphdr *udp = (void *)(ip + 1);
        if ((void *)(udp + 1) <= data_end && udp->dest == htons(PROBE_PORT))
            bump(C_UDP4_PROBE);
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_UDP)
            return TC_ACT_OK;
        struct udphdr *udp = (void *)(ip6 + 1);
        if ((void *)(udp + 1) <= data_end && udp->dest == htons(PROBE_PORT))
            bump(C_UDP6_PROBE);
    }
    return TC_ACT_OK;
}
"""

# clsact's ingress hook, as `tc filter add dev X ingress` names it.
TC_H_CLSACT_INGRESS = "ffff:fff2"

SENDER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as s:
    for _ in range(int(sys.argv[3])):
        s.sendto(b"fqdnproxy-probe", (sys.argv[1], int(sys.argv[2])))
"""


def _root_state() -> tuple[set[str], set[tuple[int, str]], set[str]]:
    """What a test could leak into the root namespace: links, qdiscs, pinned BPF objects."""
    with IPRoute() as ipr:
        links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        qdiscs = {(q["index"], q.get_attr("TCA_KIND")) for q in ipr.get_qdiscs()}
    bpffs = Path("/sys/fs/bpf")
    pinned = {str(p) for p in bpffs.rglob("*")} if bpffs.is_dir() else set()
    return links, qdiscs, pinned


def _counter(bpf, key: int) -> int:
    import ctypes

    return int(bpf[b"counters"].sum(ctypes.c_int(key)).value)


@pytest.mark.root
def test_tc_program_counts_real_traffic() -> None:
    require(os.path.isdir("/proc/sys/net"), "needs network namespaces")
    try:
        bpf = toolchain.compile_program(COUNTER_SRC, [f"-DPROBE_PORT={PROBE_PORT}"])
    except toolchain.ToolchainError as exc:
        require(False, f"bcc cannot compile a tc program: {exc}")
        raise  # unreachable: require() skips or fails
    before = _root_state()
    sent = 20
    try:
        fn = bpf.load_func(b"count_ingress", bpf.SCHED_CLS)
        with netns.veth_pair() as pair:
            with NetNS(pair.b.ns) as ns:
                index = ns.link_lookup(ifname=pair.b.ifname)[0]
                ns.tc("add", "clsact", index)
                ns.tc(
                    "add-filter",
                    "bpf",
                    index,
                    ":1",
                    fd=fn.fd,
                    name=fn.name,
                    parent=TC_H_CLSACT_INGRESS,
                    classid=1,
                    direct_action=True,
                )
                assert any(q.get_attr("TCA_KIND") == "clsact" for q in ns.get_qdiscs(index=index))

            assert _counter(bpf, 1) == 0 and _counter(bpf, 2) == 0
            for dest in (pair.b.ip, pair.b.ip6):
                netns.run(pair.a.ns, sys.executable, "-c", SENDER, dest, str(PROBE_PORT), str(sent))

            # veth delivery is synchronous in the sender's context: the counts are final here.
            assert _counter(bpf, 1) == sent
            assert _counter(bpf, 2) == sent
            assert _counter(bpf, 0) >= 2 * sent  # plus ARP / neighbour discovery
            names = (pair.a.ns, pair.b.ns)
    finally:
        bpf.cleanup()
    for name in names:
        assert not netns.exists(name)
    assert _root_state() == before


@pytest.mark.root
def test_veth_pair_teardown_on_error() -> None:
    """A failing body still deletes both namespaces."""
    with pytest.raises(RuntimeError), netns.veth_pair() as pair:
        names = (pair.a.ns, pair.b.ns)
        assert all(netns.exists(n) for n in names)
        raise RuntimeError("boom")
    assert not any(netns.exists(n) for n in names)


def test_sender_script_is_valid_python() -> None:
    compile(SENDER, "<sender>", "exec")
    assert socket.has_ipv6


def _resident_kb(libraries: tuple[str, ...]) -> int:
    """Resident KiB of this process's mappings of ``libraries`` that no other process maps
    (/proc/self/smaps, Private_*). MADV_PAGEOUT leaves pages another process also maps (another
    bcc user on the machine) resident, and so should this count."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                counting = len(fields) >= 6 and any(name in fields[5] for name in libraries)
            elif counting and fields[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(fields[1])
    return total


@pytest.mark.root
def test_the_compilers_code_is_given_back_after_a_compile() -> None:
    require(os.geteuid() == 0, "compiling with bcc needs root")
    bpf = toolchain.compile_program("int ok(void *ctx) { return 0; }")
    try:
        assert toolchain._compiler_mappings(), "bcc compiled without LLVM mapped?"
        # libLLVM and libclang-cpp hold about 80 MB resident right after a compile here.
        resident_mb = _resident_kb(toolchain.COMPILER_LIBRARIES) / 1024
        assert resident_mb < 20, f"{resident_mb:.0f} MB of the compiler's code still resident"
    finally:
        bpf.cleanup()
