#!/usr/bin/env bash
# Bootstrap a Debian 12 machine for fqdnproxy: system packages, the kernel-header tree bcc needs,
# and the virtual environment. Idempotent; a second run only checks and prints "ok" lines.
#
#   scripts/bootstrap.sh            # as root (or with sudo available)
#
# Environment:
#   FQDNPROXY_HEADERS_ROOT  where the merged header tree goes (default /var/cache/fqdnproxy/kernel-headers)
#   FQDNPROXY_FORCE=1       redo every step even if it looks done
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
VENV="$REPO/.venv"
ENV_FILE="$VENV/fqdnproxy.env"
PIP_STAMP="$VENV/.fqdnproxy-pip-stamp"
HEADERS_ROOT=${FQDNPROXY_HEADERS_ROOT:-/var/cache/fqdnproxy/kernel-headers}
FORCE=${FQDNPROXY_FORCE:-0}
RELEASE=$(uname -r)

# What each package is for:
#   python3-bpfcc bpfcc-tools   bcc (Python module, libbcc with clang/llvm, libelf) and bpftool-like tools
#   linux-headers-amd64         kernel headers for bcc's compile (merged into a shim tree below)
#   iproute2 nftables python3-nftables   ip/tc/netns, TPROXY rules
#   knot knot-dnsutils dnsutils dnsperf  real upstream DNS server, kdig/dig, load generator
#   python3-venv python3-dev    the virtual environment (built on /usr/bin/python3 for bcc)
#   dnsmasq-base                comparison benchmarks only (binary, no service)
#   rsync                       to overlay the header trees
#   kmod                        bcc calls modprobe when it looks for kheaders
#   dnstap-ldns                 a real dnstap reader, for the dnstap sink's tests
PACKAGES=(
    python3-bpfcc bpfcc-tools linux-headers-amd64
    iproute2 nftables python3-nftables
    knot knot-dnsutils dnsutils dnsperf
    python3-venv python3-dev
    dnsmasq-base rsync kmod dnstap-ldns
)

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    die "run as root (or install sudo): apt and the header tree under $HEADERS_ROOT need it"
fi

# --- 1. system packages ---------------------------------------------------------------------
missing_packages() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [[ $status == ii* ]] || printf '%s\n' "$pkg"
    done
}

mapfile -t MISSING < <(missing_packages)
if [[ ${#MISSING[@]} -eq 0 && $FORCE != 1 ]]; then
    say "apt: ok (${#PACKAGES[@]} packages installed)"
else
    say "apt: installing ${MISSING[*]:-${PACKAGES[*]}}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >/dev/null
    mapfile -t MISSING < <(missing_packages)
    [[ ${#MISSING[@]} -eq 0 ]] || die "apt could not install: ${MISSING[*]}"
    say "apt: installed"
fi

# --- 2. kernel headers for bcc --------------------------------------------------------------
# bcc compiles against /lib/modules/$(uname -r)/build. Kernels not built by Debian (this one) have
# no such tree, so we merge the Debian linux-headers package bcc can use: the -common tree (arch-
# independent headers, include/linux/kconfig.h) overlaid with the -amd64 tree (.config,
# include/generated/autoconf.h, arch/x86/include/generated). BCC_KERNEL_SOURCE must point at one
# tree that has both; pointing it at the -amd64 tree alone fails on ./include/linux/kconfig.h.
if [[ -f /lib/modules/$RELEASE/build/include/generated/autoconf.h ]]; then
    KERNEL_SOURCE=/lib/modules/$RELEASE/build
    say "headers: ok (running kernel has $KERNEL_SOURCE)"
else
    # The flavour package the meta-package depends on, e.g. linux-headers-6.1.0-56-amd64.
    flavour=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1)
    [[ -n $flavour ]] || die "cannot tell which linux-headers-*-amd64 linux-headers-amd64 depends on"
    abi=${flavour#linux-headers-}
    abi=${abi%-amd64}
    common_dir=/usr/src/linux-headers-$abi-common
    arch_dir=/usr/src/$flavour
    [[ -d $common_dir && -d $arch_dir ]] || die "missing $common_dir or $arch_dir"
    stamp_want="$flavour $(dpkg-query -W -f='${Version}' "$flavour")"
    KERNEL_SOURCE=$HEADERS_ROOT/$RELEASE
    if [[ $FORCE != 1 && -f $KERNEL_SOURCE/.fqdnproxy-stamp && $(<"$KERNEL_SOURCE/.fqdnproxy-stamp") == "$stamp_want" ]]; then
        say "headers: ok ($KERNEL_SOURCE from $stamp_want)"
    else
        say "headers: merging $common_dir + $arch_dir into $KERNEL_SOURCE"
        tmp=$KERNEL_SOURCE.tmp.$$
        "${SUDO[@]}" mkdir -p "$HEADERS_ROOT"
        "${SUDO[@]}" rm -rf "$tmp"
        "${SUDO[@]}" rsync -a "$common_dir/" "$tmp/"
        "${SUDO[@]}" rsync -a "$arch_dir/" "$tmp/"
        # scripts/ and tools/ are relative links into /usr/lib/linux-kbuild-*; keep them valid.
        for link in scripts tools; do
            if [[ -L $arch_dir/$link ]]; then
                "${SUDO[@]}" ln -sfn "$(readlink -f "$arch_dir/$link")" "$tmp/$link"
            fi
        done
        printf '%s\n' "$stamp_want" | "${SUDO[@]}" tee "$tmp/.fqdnproxy-stamp" >/dev/null
        "${SUDO[@]}" rm -rf "$KERNEL_SOURCE"
        "${SUDO[@]}" mv "$tmp" "$KERNEL_SOURCE"
        say "headers: built (headers $stamp_want for running kernel $RELEASE)"
    fi
fi

# --- 3. virtual environment -----------------------------------------------------------------
# bcc's Python module comes from python3-bpfcc in /usr/lib/python3/dist-packages, so the venv is
# made from Debian's /usr/bin/python3 with --system-site-packages.
venv_ok() {
    [[ -x $VENV/bin/python ]] &&
        grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null &&
        grep -q '^home = /usr/bin$' "$VENV/pyvenv.cfg" 2>/dev/null
}
if venv_ok; then
    say "venv: ok ($VENV)"
else
    say "venv: creating $VENV from /usr/bin/python3 --system-site-packages"
    /usr/bin/python3 -m venv --clear --system-site-packages "$VENV"
    rm -f "$PIP_STAMP"
fi

if [[ $FORCE != 1 && -f $PIP_STAMP && $PIP_STAMP -nt pyproject.toml ]]; then
    say "pip: ok (stamp newer than pyproject.toml)"
else
    say "pip: installing -e '.[test]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$PIP_STAMP"
fi

# --- 4. environment file and smoke check ----------------------------------------------------
want_env="# written by scripts/bootstrap.sh; sourced by the Makefile
BCC_KERNEL_SOURCE=$KERNEL_SOURCE"
if [[ ! -f $ENV_FILE || $(<"$ENV_FILE") != "$want_env" ]]; then
    printf '%s\n' "$want_env" >"$ENV_FILE"
fi
say "env: $ENV_FILE (BCC_KERNEL_SOURCE=$KERNEL_SOURCE)"

"$VENV/bin/python" -c 'import bcc, dnslib, pyroute2, pytest' ||
    die "the venv cannot import bcc/dnslib/pyroute2/pytest"
say "done"
