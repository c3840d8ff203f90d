"""What the datapath tests leave behind if they die: recorded, and swept by the next run.

Every namespace and bpffs mount these tests make is written to a ledger under LEDGER_DIR named
after the pytest process (``<pid>.ledger``) before it is made, and struck off once it is gone.
A run that ends normally leaves an empty ledger and deletes it, and at the end of the session
the emptied directory (``tidy``); a SIGTERM is turned into KeyboardInterrupt so that fixtures
still tear down; after a SIGKILL the next run's ``sweep()`` deletes the namespaces and unmounts
the bpffs of every ledger whose process is dead. Ledgers of live processes (a concurrent run)
are never touched, and nothing is swept by name pattern.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

LEDGER_DIR = Path("/run/fqdnproxy-tests/datapath")


def _ledger(pid: int | None = None) -> Path:
    return LEDGER_DIR / f"{pid or os.getpid()}.ledger"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record(kind: str, name: str) -> None:
    """Note a ``netns`` or ``mount`` about to be made by this process."""
    for attempt in range(2):
        LEDGER_DIR.mkdir(parents=True, exist_ok=True)
        try:
            with _ledger().open("a") as f:
                f.write(f"{kind} {name}\n")
            return
        except FileNotFoundError:  # a concurrent run's tidy() removed the empty directory
            if attempt:
                raise


def strike(kind: str, name: str) -> None:
    """Note that ``record(kind, name)``'s object is gone."""
    path = _ledger()
    with contextlib.suppress(FileNotFoundError):
        lines = [line for line in path.read_text().splitlines() if line != f"{kind} {name}"]
        if lines:
            path.write_text("".join(f"{line}\n" for line in lines))
        else:
            path.unlink()


def _remove(kind: str, name: str) -> None:
    if kind == "netns" and Path("/run/netns", name).exists():
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    elif kind == "mount" and os.path.ismount(name):
        subprocess.run(["umount", name], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(name)


def tidy() -> None:
    """Remove the ledger directory, and its parent, once they are empty: a run that ended
    normally leaves nothing in /run. A concurrent run's ledger keeps them (rmdir fails)."""
    for directory in (LEDGER_DIR, LEDGER_DIR.parent):
        try:
            directory.rmdir()
        except OSError:  # not empty, or already gone
            return


def sweep() -> list[str]:
    """Remove what dead test processes recorded; return what was removed."""
    removed = []
    if not LEDGER_DIR.is_dir():
        return removed
    for path in LEDGER_DIR.glob("*.ledger"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        # Mounts first: a namespace may still hold a program whose maps are pinned there.
        entries = [line.split(" ", 1) for line in path.read_text().splitlines() if " " in line]
        for kind, name in sorted(entries, key=lambda e: e[0] != "mount"):
            _remove(kind, name)
            removed.append(f"{kind} {name}")
        path.unlink()
    return removed
