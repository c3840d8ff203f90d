"""The BPF toolchain: find the kernel headers bcc compiles against, and compile with them.

bcc builds every program with clang against a kernel header tree. It looks at
``$BCC_KERNEL_SOURCE`` first, then ``/lib/modules/$(uname -r)/build`` (plus ``source`` beside it).
Kernels that Debian did not build have neither, so ``scripts/bootstrap.sh`` merges Debian's
``linux-headers-*-common`` tree with the ``linux-headers-*-amd64`` tree into
``/var/cache/fqdnproxy/kernel-headers/$(uname -r)``. One merged tree is what
``BCC_KERNEL_SOURCE`` needs: bcc then uses it as both build and source tree, so it must hold
``include/linux/kconfig.h`` (from -common) and ``include/generated/autoconf.h`` (from -amd64).

The headers may be older than the running kernel. That is fine for tc programs: they use the
stable UAPI (``struct __sk_buff``, helpers by number), and the kernel does not check a
SCHED_CLS program's version.

Only this package imports bcc; it is imported lazily so the rest of fqdnproxy (and its pure
tests) runs without it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fqdnproxy.errors import FqdnproxyError

if TYPE_CHECKING:
    import bcc

ENV_VAR = "BCC_KERNEL_SOURCE"
# Where scripts/bootstrap.sh puts the merged tree, one directory per kernel release.
SHIM_ROOT = Path("/var/cache/fqdnproxy/kernel-headers")

_AUTOCONF = "include/generated/autoconf.h"
_KCONFIG = "include/linux/kconfig.h"


class ToolchainError(FqdnproxyError):
    """The BPF toolchain (bcc and kernel headers) is not usable; run `make bootstrap`."""


def kernel_release() -> str:
    """Return the running kernel's release, as ``uname -r`` prints it."""
    return os.uname().release


def _is_merged_tree(path: Path) -> bool:
    return (path / _AUTOCONF).is_file() and (path / _KCONFIG).is_file()


def find_kernel_headers(
    environ: Mapping[str, str] | None = None,
    release: str | None = None,
    shim_root: Path = SHIM_ROOT,
    modules_root: Path = Path("/lib/modules"),
) -> Path:
    """Return the kernel header tree bcc should use, in bcc's own order of preference.

    ``$BCC_KERNEL_SOURCE`` if set, else ``/lib/modules/RELEASE/build`` if it has generated
    headers, else the bootstrap's merged tree ``SHIM_ROOT/RELEASE``.

    Raises:
        ToolchainError: no usable tree; the message names where it looked.
    """
    environ = os.environ if environ is None else environ
    release = kernel_release() if release is None else release

    explicit = environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit)
        if _is_merged_tree(path):
            return path
        raise ToolchainError(
            f"{ENV_VAR}={explicit} is not a kernel header tree with both {_AUTOCONF} and "
            f"{_KCONFIG}; unset it, or run `make bootstrap` to build one in {shim_root}"
        )

    # Distribution kernels: bcc pairs build/ (generated headers) with source/ by itself.
    build = modules_root / release / "build"
    if (build / _AUTOCONF).is_file():
        return build

    shim = shim_root / release
    if _is_merged_tree(shim):
        return shim
    raise ToolchainError(
        f"no kernel headers for kernel {release}: {build} and {shim} are missing or "
        f"incomplete, and {ENV_VAR} is unset; run `make bootstrap` to build {shim}"
    )


def compile_program(text: str, cflags: Sequence[str] = ()) -> bcc.BPF:
    """Compile BPF C ``text`` with bcc against the kernel headers, passing ``cflags`` to clang.

    Sets ``$BCC_KERNEL_SOURCE`` in this process (libbcc reads it with getenv) when it was unset.

    Raises:
        ToolchainError: no headers, bcc missing, or clang rejected the program (clang's own
            diagnostics go to stderr; bcc does not return them).
    """
    headers = find_kernel_headers()
    os.environ[ENV_VAR] = str(headers)
    try:
        from bcc import BPF
    except ImportError as exc:
        raise ToolchainError(
            f"cannot import bcc ({exc}): it comes from Debian's python3-bpfcc, so the venv must "
            "be made from /usr/bin/python3 with --system-site-packages; run `make bootstrap`"
        ) from exc
    try:
        # bcc 0.26 wants bytes and warns (DeprecationWarning) on str.
        return BPF(text=text.encode(), cflags=list(cflags))
    except Exception as exc:  # bcc raises bare Exception on compile failure
        raise ToolchainError(
            f"bcc failed to compile the program against {headers}: {exc} "
            "(clang's diagnostics are on stderr)"
        ) from exc
    finally:
        _return_compiler_memory()


# The compiler's shared libraries: bcc needs them to compile, not to run the loaded program.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
_MADV_PAGEOUT = 21  # linux/mman.h, Linux 5.4+


def _return_compiler_memory() -> None:
    """Give back what compiling left resident: the heap clang and LLVM freed (glibc keeps it
    otherwise), and the pages of LLVM's and clang's code, clean file-backed pages the kernel can
    read again from disk should anything touch them (only another compile does).

    Measured on this machine: loading the program took the process from 36 to 169 MB RSS; the
    trim took it to 132 MB, of which 82 MB were libLLVM's and libclang-cpp's code; paging those
    out leaves about 50 MB. Best effort: without glibc or MADV_PAGEOUT nothing happens."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in _compiler_mappings():
        libc.madvise(start, end - start, _MADV_PAGEOUT)  # EINVAL on old kernels: harmless


def _compiler_mappings() -> list[tuple[int, int]]:
    """(start, end) of every mapping of the compiler's libraries in this process."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and any(name in fields[5] for name in COMPILER_LIBRARIES):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mappings.append((start, end))
    return mappings
