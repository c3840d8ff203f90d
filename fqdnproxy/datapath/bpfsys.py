"""Thin ctypes bindings to libbpf for what bcc does not offer: pinned objects, batches, test runs.

bcc's tables work only inside the process that compiled the program. ``fqdnproxy map dump``, the
layout check before a load, and the 1M-entry batch updates need a map by its pinned path, so
they go through libbpf (Debian's libbpf1, which bcc depends on) directly. Every failure raises
``BpfError`` carrying the errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
from dataclasses import dataclass
from pathlib import Path

from fqdnproxy.errors import FqdnproxyError

BPF_FS_MAGIC = 0xCAFE4A11
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


class BpfError(FqdnproxyError, OSError):
    """A bpf() operation failed."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(f"{message}: {os.strerror(err)}" if err else message)
        self.errno = err


def _load_libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(f"cannot load libbpf ({exc}); install Debian's libbpf1") from exc


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The libbpf handle, loaded on first use."""
    global _lib
    if _lib is None:
        _lib = _load_libbpf()
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise BpfError(what, err)
    return rc


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map: the fields the layout check compares."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


class _MapInfoC(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def obj_get(path: str | Path) -> int:
    """Open the pinned object at ``path``; return a new fd (the caller closes it).

    Raises:
        BpfError: errno ENOENT when nothing is pinned there.
    """
    return _check(lib().bpf_obj_get(os.fsencode(str(path))), f"bpf_obj_get({path})")


def map_info(fd: int) -> MapInfo:
    """Return the kernel's description of map ``fd``."""
    info = _MapInfoC()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode(errors="replace"))


def lookup(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value: ctypes._CData) -> bool:
    """Fill ``value`` with the entry under ``key``; return False when there is none."""
    rc = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if rc < 0 and (ctypes.get_errno() or -rc) == errno_mod.ENOENT:
        return False
    _check(rc, "map lookup")
    return True


def update(fd: int, key: ctypes._CData, value: ctypes._CData, flags: int = BPF_ANY) -> None:
    """Insert or replace one entry."""
    _check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value),
                                     ctypes.c_uint64(flags)), "map update")


def delete(fd: int, key: ctypes._CData) -> bool:
    """Delete one entry; return False when there was none."""
    rc = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc < 0 and (ctypes.get_errno() or -rc) == errno_mod.ENOENT:
        return False
    _check(rc, "map delete")
    return True


def next_key(fd: int, key: ctypes._CData | None, out: ctypes._CData) -> bool:
    """Fill ``out`` with the key after ``key`` (None: the first); False at the end."""
    rc = lib().bpf_map_get_next_key(fd, ctypes.byref(key) if key is not None else None,
                                    ctypes.byref(out))
    if rc < 0 and (ctypes.get_errno() or -rc) == errno_mod.ENOENT:
        return False
    _check(rc, "map get_next_key")
    return True


def update_batch(fd: int, keys: ctypes.Array | bytes, values: ctypes.Array | bytes,
                 count: int) -> None:
    """BPF_MAP_UPDATE_BATCH of the first ``count`` keys and values.

    ``bytes`` are passed as they are (ctypes hands C a pointer to their buffer, no copy): the
    kernel only reads the keys and values of an update.

    Raises:
        BpfError: errno EINVAL or ENOTSUPP (524) when the map type has no batch update.
    """
    n = ctypes.c_uint32(count)
    _check(lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(n), None), "map update batch")


def delete_batch(fd: int, keys: ctypes.Array, count: int) -> int:
    """BPF_MAP_DELETE_BATCH; returns how many were deleted before any error."""
    n = ctypes.c_uint32(count)
    rc = lib().bpf_map_delete_batch(fd, keys, ctypes.byref(n), None)
    if rc < 0 and (ctypes.get_errno() or -rc) != errno_mod.ENOENT:
        _check(rc, "map delete batch")
    return n.value


def lookup_batch(fd: int, token: ctypes.Array | None, out_token: ctypes.Array,
                 keys: ctypes.Array, values: ctypes.Array, count: int) -> tuple[int, bool]:
    """BPF_MAP_LOOKUP_BATCH from ``token`` (None: the start): return (entries read, finished)."""
    n = ctypes.c_uint32(count)
    rc = lib().bpf_map_lookup_batch(fd, token, out_token, keys, values, ctypes.byref(n), None)
    if rc < 0:
        err = ctypes.get_errno() or -rc
        if err == errno_mod.ENOENT:
            return n.value, True
        raise BpfError("map lookup batch", err)
    return n.value, False


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: run the program on ``packet`` ``repeat`` times in the kernel.

    Returns (the program's return value, mean ns per run as the kernel measured it).
    """
    buf = ctypes.create_string_buffer(packet, len(packet))
    out = ctypes.create_string_buffer(len(packet) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), repeat=repeat)
    opts.data_in = ctypes.cast(buf, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = len(out)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, opts.duration


# --- bpffs ---------------------------------------------------------------------------------------


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)


def is_bpffs(path: str | Path) -> bool:
    """Report whether ``path`` exists and lies on a bpf filesystem."""
    st = _Statfs()
    if _libc.statfs(os.fsencode(str(path)), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def mount_bpffs(mountpoint: str | Path) -> None:
    """Mount a bpf filesystem on ``mountpoint`` (which must exist), mode 0700."""
    rc = _libc.mount(b"bpf", os.fsencode(str(mountpoint)), b"bpf", ctypes.c_ulong(0), b"mode=0700")
    if rc != 0:
        raise BpfError(f"mount -t bpf bpf {mountpoint}", ctypes.get_errno())


def umount(mountpoint: str | Path) -> None:
    """Unmount ``mountpoint`` (tests use private bpffs instances)."""
    if _libc.umount2(os.fsencode(str(mountpoint)), 0) != 0:
        raise BpfError(f"umount {mountpoint}", ctypes.get_errno())
