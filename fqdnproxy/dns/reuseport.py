"""Sharing a listener between DNS worker processes (``dns.workers``): SO_REUSEPORT, and a
classic BPF program that spreads the datagrams over them.

Sockets bound to one address with SO_REUSEPORT form a group, and the kernel hands each datagram
(and each new TCP connection) to one of them. By default it picks by a hash of the 4-tuple, so
all the queries of one client socket go to one worker: a resolver that keeps its socket, or a
load generator with a few sockets, loads one worker while the others idle (a benchmark run put
6 of dnsperf's 8 sockets on one of two workers). Any worker can answer any query (each keeps its
own cache and allow map, see workers.py), so the group gets a program that picks a socket at
random for every datagram instead: ``SKF_AD_RANDOM % workers``.

The kernel runs the program only where it has the packet: for queries sent to the listener's
own address (explicit mode). Under TPROXY (transparent mode) its socket lookup passes no packet
and the kernel keeps hashing, as it does when the program picks a socket the group does not have
(a worker restarting).
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
_SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM, as the u32 ``k`` of a load
_LD_W_ABS, _ALU_MOD_K, _RET_A = 0x20, 0x94, 0x16  # BPF_LD|W|ABS, BPF_ALU|MOD|K, BPF_RET|A
_INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_PROGRAM = struct.Struct("=H6xQ")  # struct sock_fprog: len, (pad), filter pointer


def share(sock: socket.socket) -> None:
    """Let ``sock`` join the group of sockets bound to its address (call before bind)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def spread(sock: socket.socket, workers: int) -> None:
    """Make ``sock``'s group hand each datagram or connection to one of its first ``workers``
    sockets at random (call after bind; the program is the group's, so each worker setting the
    same one is harmless).

    Raises:
        OSError: the kernel refused the program.
    """
    code = (_INSTRUCTION.pack(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM)
            + _INSTRUCTION.pack(_ALU_MOD_K, 0, 0, workers)
            + _INSTRUCTION.pack(_RET_A, 0, 0, 0))
    buffer = ctypes.create_string_buffer(code, len(code))  # alive until setsockopt returns
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                    _PROGRAM.pack(len(code) // _INSTRUCTION.size, ctypes.addressof(buffer)))
