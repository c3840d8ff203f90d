"""Fixtures for datapath root tests: a private bpffs, the topology, a loaded datapath."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.datapath import leftovers


_SESSION_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    # Only in pytest itself: a forked helper (pyroute2's NetNS is a fork of this process) that
    # raised here would unwind a copy of the test stack and run its teardowns a second time.
    if os.getpid() != _SESSION_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Sweep what killed earlier runs left (see leftovers.py); let SIGTERM run the teardowns."""
    global _SESSION_PID
    _SESSION_PID = os.getpid()
    if os.geteuid() == 0:
        leftovers.sweep()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def bpffs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private bpf filesystem (unmounted after the module): nothing pinned machine-wide."""
    require(os.geteuid() == 0, "needs root (tier-3 test: BPF, netns, tc)")
    from fqdnproxy.datapath import bpfsys

    mountpoint = tmp_path_factory.mktemp("bpffs")
    leftovers.record("mount", str(mountpoint))
    try:
        bpfsys.mount_bpffs(mountpoint)
    except bpfsys.BpfError as exc:
        leftovers.strike("mount", str(mountpoint))
        require(False, f"cannot mount bpffs: {exc}")
    try:
        yield mountpoint
    finally:
        bpfsys.umount(mountpoint)
        leftovers.strike("mount", str(mountpoint))


@pytest.fixture
def pin_dir(bpffs: Path) -> Path:
    """A fresh pin directory (fqdnproxy-test-<hex>) on the private bpffs."""
    return bpffs / f"fqdnproxy-test-{secrets.token_hex(4)}"
