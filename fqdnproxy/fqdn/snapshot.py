"""The cache snapshot: what survives an agent restart besides the pinned maps.

The pinned allow map keeps enforcing across a restart on its own (the kernel checks expiry), so
no connection depends on this file. What the snapshot adds is the *names*: without it a restarted
agent sees IPs in the map but not which names they were learned for, and could not re-evaluate
them when policies change. Entries found in the map but not in the snapshot are kept until they
expire, under the name ``restored`` (see ``fqdn.cache.RESTORED``).

Format: one JSON document, written atomically (a temporary file in the same directory, fsync,
rename, fsync of the directory), so a ``kill -9`` at any moment leaves either the old snapshot or
the new one, never half of one:

    {"version": 1, "boot_id": "...", "saved_kernel_ns": N, "saved_time": T,
     "entries": [[endpoint_id, name, ip, expiry_kernel_ns], ...]}

Expiries are kernel monotonic nanoseconds, which restart at boot: a snapshot from another boot
(``boot_id`` differs) is ignored, as are the maps, which a reboot empties anyway.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.fqdn.cache import LOOKUP, CacheEntry

VERSION = 1
FILE_NAME = "fqdn-cache.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class SnapshotError(FqdnproxyError):
    """The snapshot could not be written or read."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``load`` found: the entries still valid, and why others were not taken."""

    entries: tuple[CacheEntry, ...]
    expired: int = 0
    note: str = ""


def boot_id() -> str:
    """This boot's id: kernel monotonic times are only comparable within one boot."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def encode(entries: Iterable[tuple[int, str, str, int]], kernel_now_ns: int, wall_now: float,
           boot: str) -> bytes:
    """The snapshot document for ``entries`` ((endpoint, name, ip, expiry) tuples)."""
    return orjson.dumps({
        "version": VERSION, "boot_id": boot, "saved_kernel_ns": kernel_now_ns,
        "saved_time": wall_now, "entries": [list(e) for e in entries],
    })


def save(directory: Path, document: bytes) -> Path:
    """Write ``document`` to ``directory/FILE_NAME`` atomically; the path.

    Raises:
        SnapshotError: the directory is missing, unwritable or full.
    """
    target = directory / FILE_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".fqdn-cache.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(document)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        raise SnapshotError(f"cannot write {target}: {error.strerror or error}") from None
    return target


def load(directory: Path, kernel_now_ns: int, boot: str) -> Loaded:
    """The unexpired entries of the snapshot in ``directory`` (none if there is no snapshot).

    A missing, unreadable, corrupt or foreign-boot snapshot yields no entries and a ``note``
    saying why; it never stops the agent (the pinned map still enforces, and its entries come
    back as "restored").
    """
    path = directory / FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Loaded((), note="no snapshot")
    except OSError as error:
        return Loaded((), note=f"cannot read {path}: {error.strerror}")
    try:
        document = orjson.loads(raw)
        if document.get("version") != VERSION:
            return Loaded((), note=f"{path}: snapshot version {document.get('version')!r}, "
                                   f"expected {VERSION}; ignored")
        if document.get("boot_id") != boot:
            return Loaded((), note=f"{path}: written before the last reboot; ignored")
        entries = []
        expired = 0
        for endpoint_id, name, ip, expiry in document["entries"]:
            if expiry <= kernel_now_ns:
                expired += 1
                continue
            entries.append(CacheEntry(int(endpoint_id), str(name), str(ip), int(expiry), LOOKUP))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
        return Loaded((), note=f"{path}: corrupt snapshot ignored ({error})")
    return Loaded(tuple(entries), expired)
