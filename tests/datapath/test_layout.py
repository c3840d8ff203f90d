"""Root tests: the Python codecs agree with the C structs; a pinned layout mismatch is refused."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from fqdnproxy.datapath import bpfsys, egress, maps, pinned, toolchain

pytestmark = pytest.mark.root


def test_codecs_match_the_c_structs(pin_dir: Path, bpffs: Path) -> None:
    # load() passes maps.layout_cflags(): the C's _Static_asserts check every size and offset.
    # Compiled for the most DNS workers, so every worker's exact map exists too.
    options = egress.Options(workers=maps.MAX_WORKERS)
    with egress.EgressDatapath.load(pin_dir, options, bpffs=bpffs) as dp:
        for name, (key_size, value_size) in maps.MAP_SIZES.items():
            table = dp._program.bpf[name.encode()]  # type: ignore[union-attr]
            assert ctypes.sizeof(table.Key) == key_size, name
            if name != "counters":
                assert ctypes.sizeof(table.Leaf) == value_size, name
        assert dp.maps.layout_version() == maps.LAYOUT_VERSION


def test_a_drifted_codec_fails_the_compile(pin_dir: Path, bpffs: Path) -> None:
    egress.ensure_bpffs(pin_dir, bpffs)
    flags = egress.Options().cflags(pin_dir) + [
        "-DFQDN_EXPECT_LAYOUT=FQDN_EXPECT_SIZE(ct_key, 48)"]
    with pytest.raises(toolchain.ToolchainError):
        toolchain.compile_program(egress.SOURCE.read_text(), flags)


def test_pinned_layout_mismatch_is_a_clear_error(pin_dir: Path, bpffs: Path) -> None:
    egress.EgressDatapath.load(pin_dir, egress.Options(), bpffs=bpffs).close()
    fd = bpfsys.obj_get(pin_dir / "meta")
    bpfsys.update(fd, ctypes.c_uint32(0), maps.MetaValue(layout_version=99))
    with pytest.raises(pinned.LayoutMismatch, match=r"no in-place migration.*stop the agent.*rm -r"):
        egress.EgressDatapath.load(pin_dir, egress.Options(), bpffs=bpffs)
    with pytest.raises(pinned.LayoutMismatch, match="stored layout version is 99"):
        pinned.PinnedMaps.open(pin_dir)


def test_map_sizes_are_set_at_first_pin_and_a_later_difference_is_reported(
        pin_dir: Path, bpffs: Path) -> None:
    small = egress.Options(allow_max=1000, ct_max=2000)
    egress.EgressDatapath.load(pin_dir, small, bpffs=bpffs).close()
    assert pinned.size_differences(pin_dir, {"allow_exact": 1000, "allow": 1000, "ct": 2000}) == []
    # A new size asked of existing pins: bcc keeps the pinned maps (the kernel cannot resize
    # them), the program loads, and the agent can say what stays.
    bigger = egress.Options(allow_max=4000, ct_max=2000)
    with egress.EgressDatapath.load(pin_dir, bigger, bpffs=bpffs) as dp:
        assert dp.program_loaded
    assert pinned.size_differences(pin_dir, {"allow_exact": 4000, "allow": 4000, "ct": 2000}) == [
        ("allow_exact", 4000, 1000), ("allow", 4000, 1000)]
    assert pinned.size_differences(pin_dir / "nothing-here", {"allow": 1}) == []


def test_ensure_bpffs_mounts_when_missing(tmp_path: Path) -> None:
    mountpoint = tmp_path / "bpf"
    egress.ensure_bpffs(mountpoint / "fqdnproxy", mountpoint)
    try:
        assert bpfsys.is_bpffs(mountpoint / "fqdnproxy")
    finally:
        bpfsys.umount(mountpoint)
    with pytest.raises(egress.DatapathError):
        egress.ensure_bpffs(tmp_path / "elsewhere", mountpoint)


def test_map_dump_command(pin_dir: Path, bpffs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fqdnproxy import cli
    from fqdnproxy.datapath.allowmap import AllowEntry, PortRange, kernel_now_ns

    with egress.EgressDatapath.load(pin_dir, egress.Options(), bpffs=bpffs) as dp:
        dp.upsert_allows([AllowEntry(3, "203.0.113.5/32", kernel_now_ns() + 60 * 10**9,
                                     (PortRange(6, 443, 443),)), AllowEntry(3, "2001:db8::/32")])
    assert cli.main(["map", "dump", "--pin-dir", str(pin_dir)]) == 0
    table = capsys.readouterr().out
    assert "203.0.113.5/32" in table and "tcp/443" in table and "static" in table
    assert cli.main(["map", "dump", "--pin-dir", str(pin_dir), "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["endpoint"] == 3 and 55 < rows[0]["expires_in"] <= 60
    assert cli.main(["map", "dump", "--pin-dir", str(bpffs / "nothing")]) == cli.ExitCode.USAGE
