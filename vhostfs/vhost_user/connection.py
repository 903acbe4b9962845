"""One vhost-user connection: message framing over a Unix stream socket, with SCM_RIGHTS fds.

The connection owns every fd it receives until a caller takes it: `Message.take_fds()` hands them
over, and whatever was not taken is closed when the message is done with (`Message.close()`), so a
request that carries fds it should not never leaks them.
"""

from __future__ import annotations

import array
import os
import socket

from vhostfs.vhost_user import record
from vhostfs.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    Header,
    VhostUserError,
    parse_header,
    reply_header,
)

_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class Message:
    """A received request: its header, payload and the fds that came with it."""

    __slots__ = ("header", "payload", "fds")

    def __init__(self, header: Header, payload: bytes, fds: list[int]) -> None:
        self.header = header
        self.payload = payload
        self.fds = fds

    def take_fds(self) -> list[int]:
        """Hands the fds to the caller, who must close them."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        """Closes fds nobody took."""
        for fd in self.take_fds():
            os.close(fd)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


class Connection:
    """Reads requests from and writes replies to the front end over `sock` (blocking); with a
    `recorder`, every message is recorded (vhostfs.vhost_user.record)."""

    def __init__(self, sock: socket.socket, recorder: record.Recorder | None = None) -> None:
        self.sock = sock
        self.recorder = recorder

    def _recv_exact(self, size: int, fds: list[int]) -> bytes | None:
        chunks = []
        while size:
            data, ancdata, flags, _ = self.sock.recvmsg(size, _ANCILLARY_SPACE)
            fds.extend(_fds_from_ancillary(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise VhostUserError("too many file descriptors in one message")
            if not data:
                return None
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def receive(self) -> Message | None:
        """Returns the next request, or None when the front end closed the connection.

        Raises VhostUserError for a malformed header (the stream is then out of step and must be
        dropped); any fds that came with it are closed.
        """
        fds: list[int] = []
        try:
            raw = self._recv_exact(HEADER.size, fds)
            if raw is None:
                return None
            header = parse_header(raw)
            payload = self._recv_exact(header.size, fds) if header.size else b""
            if payload is None:
                raise VhostUserError("connection closed in the middle of a message")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if self.recorder is not None:
            self.recorder.message(record.FRONT_TO_BACK, raw, payload, len(fds))
        return Message(header, payload, fds)

    def reply(self, request: int, payload: bytes) -> None:
        header = reply_header(request, len(payload))
        if self.recorder is not None:
            self.recorder.message(record.BACK_TO_FRONT, header, payload)
        self.sock.sendall(header + payload)

    def close(self) -> None:
        self.sock.close()
