"""A tiny tmpfs for root tests that need a full filesystem: mounted on a test's directory,
unmounted on exit even when the test fails, and recorded in the datapath tests' ledger so that
a killed run's mount is swept by the next one (tests/datapath/leftovers.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import require
from tests.datapath import leftovers


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "256k") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``mountpoint`` (made if missing); unmount it on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    leftovers.record("mount", str(mountpoint))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(mountpoint)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        leftovers.strike("mount", str(mountpoint))
        require(False, f"cannot mount tmpfs: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        if os.path.ismount(mountpoint):  # still busy: detach it rather than leave it behind
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        leftovers.strike("mount", str(mountpoint))


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until the filesystem has no space left; the file's path."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * 4096
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                return path
    finally:
        os.close(fd)
