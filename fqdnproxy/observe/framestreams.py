"""Frame Streams (fstrm), the transport dnstap rides on: to a file, or to a reader's unix socket.

A stream is a sequence of frames. A data frame is a 32-bit big-endian length and that many
bytes of payload. A control frame starts with a zero "length" (the escape), then its own length,
its type and typed fields; the only field is CONTENT_TYPE, here ``protobuf:dnstap.Dnstap``.

    file (unidirectional):   START(ct)  data...  STOP
    socket (bidirectional):  writer READY(ct) -> reader ACCEPT(ct) -> writer START(ct)
                             data...  writer STOP -> reader FINISH

Both writers here are blocking and used only by the dnstap writer thread. Any failure surfaces
as ``OSError`` (``FrameStreamError`` is one) so that thread has one thing to catch.
"""

from __future__ import annotations

import socket
import struct
from typing import IO, Sequence

from fqdnproxy.errors import FqdnproxyError

# Control frame types and the one field type (fstrm's control.h).
CONTROL_ACCEPT = 0x01
CONTROL_START = 0x02
CONTROL_STOP = 0x03
CONTROL_READY = 0x04
CONTROL_FINISH = 0x05
FIELD_CONTENT_TYPE = 0x01

MAX_CONTROL_FRAME = 512  # bytes; what libfstrm accepts, so a bogus peer cannot make us buffer more

_U32 = struct.Struct(">I")


class FrameStreamError(FqdnproxyError, OSError):
    """The Frame Streams peer broke the protocol."""


def control_frame(control_type: int, content_type: bytes | None = None) -> bytes:
    """A control frame, escape included, with an optional CONTENT_TYPE field."""
    body = _U32.pack(control_type)
    if content_type is not None:
        body += _U32.pack(FIELD_CONTENT_TYPE) + _U32.pack(len(content_type)) + content_type
    return _U32.pack(0) + _U32.pack(len(body)) + body


def data_frames(payloads: Sequence[bytes]) -> bytes:
    """Data frames for ``payloads``, concatenated, ready for one write."""
    return b"".join(_U32.pack(len(payload)) + payload for payload in payloads)


def parse_control(body: bytes) -> tuple[int, list[bytes]]:
    """A control frame's type and its CONTENT_TYPE values (``body`` follows the length word).

    Raises:
        FrameStreamError: the frame is truncated or carries an unknown field.
    """
    if len(body) < 4:
        raise FrameStreamError("control frame shorter than its type")
    (control_type,) = _U32.unpack_from(body)
    content_types = []
    offset = 4
    while offset < len(body):
        if offset + 8 > len(body):
            raise FrameStreamError("control field header truncated")
        field_type, length = struct.unpack_from(">II", body, offset)
        offset += 8
        if field_type != FIELD_CONTENT_TYPE or offset + length > len(body):
            raise FrameStreamError(f"bad control field {field_type} of {length} bytes")
        content_types.append(body[offset:offset + length])
        offset += length
    return control_type, content_types


class FileWriter:
    """A unidirectional stream to a file, truncated when opened (a stream has one START)."""

    name = "file"
    # Opened at startup (a bad path is a startup error) and never reopened: reopening would
    # truncate what was written, and a failed write may have left half a frame.
    retries = False

    def __init__(self, path: str, content_type: bytes) -> None:
        self._path = path
        self._content_type = content_type
        self._stream: IO[bytes] | None = None

    def open(self) -> None:
        """Create the file and write START."""
        self._stream = open(self._path, "wb")
        self._stream.write(control_frame(CONTROL_START, self._content_type))
        self._stream.flush()

    def write(self, payloads: Sequence[bytes]) -> None:
        """Write one data frame per payload."""
        assert self._stream is not None
        self._stream.write(data_frames(payloads))
        self._stream.flush()

    def close(self) -> None:
        """Write STOP and close; a no-op when not open."""
        if self._stream is None:
            return
        try:
            self._stream.write(control_frame(CONTROL_STOP))
        finally:
            self._stream.close()
            self._stream = None

    def abort(self) -> None:
        """Close after a failed write; the file is left without STOP."""
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None


class SocketWriter:
    """A bidirectional stream to a reader listening on a unix socket (dnstap collectors do)."""

    name = "socket"
    retries = True  # the reader may start later or restart: the sink reconnects

    def __init__(self, path: str, content_type: bytes, timeout: float = 1.0) -> None:
        self._path = path
        self._content_type = content_type
        self._timeout = timeout  # s; per connect, handshake read and write
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Connect and do the READY/ACCEPT/START handshake.

        Raises:
            OSError: no reader, or it refused our content type (``FrameStreamError``).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._timeout)
            sock.connect(self._path)
            sock.sendall(control_frame(CONTROL_READY, self._content_type))
            control_type, content_types = _read_control(sock)
            if control_type != CONTROL_ACCEPT:
                raise FrameStreamError(f"expected ACCEPT, got control frame {control_type}")
            if self._content_type not in content_types:
                raise FrameStreamError(
                    f"reader accepts {content_types}, not {self._content_type!r}")
            sock.sendall(control_frame(CONTROL_START, self._content_type))
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def write(self, payloads: Sequence[bytes]) -> None:
        """Write one data frame per payload; a stalled reader raises ``TimeoutError``."""
        assert self._sock is not None
        self._sock.sendall(data_frames(payloads), socket.MSG_NOSIGNAL)

    def close(self) -> None:
        """Send STOP, wait for FINISH (bounded by the timeout), close; a no-op when not open."""
        if self._sock is None:
            return
        try:
            self._sock.sendall(control_frame(CONTROL_STOP), socket.MSG_NOSIGNAL)
            _read_control(self._sock)  # FINISH; any answer (or none) ends the stream
        except OSError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the connection without the closing handshake (the reader went away)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _read_control(sock: socket.socket) -> tuple[int, list[bytes]]:
    escape, length = struct.unpack(">II", _read_exact(sock, 8))
    if escape != 0:
        raise FrameStreamError("expected a control frame, got a data frame")
    if length > MAX_CONTROL_FRAME:
        raise FrameStreamError(f"control frame of {length} bytes")
    return parse_control(_read_exact(sock, length))


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise FrameStreamError("reader closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
