"""A private bpf filesystem for root tests: maps are pinned there, never machine-wide."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import require


@contextlib.contextmanager
def private_bpffs(mountpoint: Path) -> Iterator[Path]:
    """Mount bpffs on ``mountpoint`` (an empty directory) and unmount it on exit."""
    from fqdnproxy.datapath import bpfsys

    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        bpfsys.mount_bpffs(mountpoint)
    except bpfsys.BpfError as error:
        require(False, f"cannot mount bpffs: {error}")
    try:
        yield mountpoint
    finally:
        bpfsys.umount(mountpoint)
