"""Fixtures for datapath root tests: a private bpffs, the topology, a loaded datapath."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require


@pytest.fixture(scope="module")
def bpffs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private bpf filesystem (unmounted after the module): nothing pinned machine-wide."""
    require(os.geteuid() == 0, "needs root (tier-3 test: BPF, netns, tc)")
    from fqdnproxy.datapath import bpfsys

    mountpoint = tmp_path_factory.mktemp("bpffs")
    try:
        bpfsys.mount_bpffs(mountpoint)
    except bpfsys.BpfError as exc:
        require(False, f"cannot mount bpffs: {exc}")
    try:
        yield mountpoint
    finally:
        bpfsys.umount(mountpoint)


@pytest.fixture
def pin_dir(bpffs: Path) -> Path:
    """A fresh pin directory (fqdnproxy-test-<hex>) on the private bpffs."""
    return bpffs / f"fqdnproxy-test-{secrets.token_hex(4)}"
