"""The back-end request channel: requests the back end sends to the front end (vhost-user.rst,
"Back-end communication" and "Back-end message types").

The front end hands the back end one end of a socket pair with SET_BACKEND_REQ_FD. Requests on it use
the ordinary message header; with VHOST_USER_PROTOCOL_F_REPLY_ACK negotiated the back end sets
NEED_REPLY and the front end answers with a u64 status (0: success). Files travel as SCM_RIGHTS, which
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD allows.

The back end never blocks forever on a front end: a reply that does not come within `timeout` fails
the request, and since a late reply would then answer the wrong request, the channel is closed and
every later request fails at once.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import record

log = logging.getLogger("vhostfs.vhost_user")

#: Seconds to wait for the front end to acknowledge a request.
DEFAULT_TIMEOUT = 5.0


class BackendChannel:
    """Sends back-end requests over `sock` (the channel's own socket, closed by `close`).

    `protocol_features` are the negotiated protocol feature bits. Thread-safe: requests from several
    queue workers go out and are acknowledged one at a time. With a `recorder`, requests and replies
    are recorded (vhostfs.vhost_user.record).
    """

    def __init__(self, sock: socket.socket, protocol_features: int, timeout: float = DEFAULT_TIMEOUT,
                 recorder: record.Recorder | None = None) -> None:
        self.recorder = recorder
        self._sock = sock
        self._sock.setblocking(True)
        self.protocol_features = protocol_features
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken = False

    def has(self, bit: int) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def close(self) -> None:
        """Closes the channel after the request in flight, if any."""
        with self._lock:
            self._broken = True
            self._sock.close()

    # -- requests -------------------------------------------------------------------------------
    def shmem_map(self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int,
                  writable: bool) -> None:
        """SHMEM_MAP: asks the front end to map `length` bytes of `fd` from `fd_offset` at `shm_offset`
        of shared memory region `shmid`, writable or read-only. Raises OSError if it refuses."""
        if not (self.has(m.VHOST_USER_PROTOCOL_F_SHMEM)
                and self.has(m.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD)):
            raise OSError(errno.EOPNOTSUPP, "the front end did not negotiate SHMEM and BACKEND_SEND_FD")
        flags = m.VHOST_USER_FLAG_MAP_RW if writable else 0
        self._request(m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP,
                      m.MMAP_REQUEST.pack(shmid, fd_offset, shm_offset, length, flags), [fd])

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """SHMEM_UNMAP: asks the front end to unmap one whole earlier mapping; raises OSError if refused."""
        if not self.has(m.VHOST_USER_PROTOCOL_F_SHMEM):
            raise OSError(errno.EOPNOTSUPP, "the front end did not negotiate SHMEM")
        self._request(m.BackendRequest.VHOST_USER_BACKEND_SHMEM_UNMAP,
                      m.MMAP_REQUEST.pack(shmid, 0, shm_offset, length, 0), [])

    def _request(self, request: int, payload: bytes, fds: list[int]) -> None:
        name = m.BackendRequest(request).name
        ack = self.has(m.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        flags = m.VHOST_USER_VERSION | (m.VHOST_USER_NEED_REPLY_MASK if ack else 0)
        header = m.HEADER.pack(request, flags, len(payload))
        data = header + payload
        with self._lock:
            if self._broken:
                raise OSError(errno.ENOTCONN, "the back-end channel is closed")
            if self.recorder is not None:
                self.recorder.message(record.BACKEND_REQUEST, header, payload, len(fds))
            try:
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._sock.sendall(data)
                if not ack:
                    # Without REPLY_ACK the front end sends nothing back (vhost-user.rst, REPLY_ACK).
                    return
                status = self._receive_ack(request)
            except OSError as e:
                self._break(f"{name}: {e}")
                raise OSError(errno.EIO, f"{name} failed: {e}") from None
        if status:
            raise OSError(errno.EIO, f"the front end refused {name} (status {status})")

    def _break(self, why: str) -> None:
        log.error("back-end channel closed: %s", why)
        self._broken = True
        self._sock.close()

    def _receive_ack(self, request: int) -> int:
        """Waits for the u64 reply to `request`, at most `timeout` seconds in all."""
        deadline = time.monotonic() + self.timeout
        raw = self._receive(m.HEADER.size + m.U64.size, deadline)
        if self.recorder is not None:
            self.recorder.message(record.BACKEND_REPLY, raw[:m.HEADER.size], raw[m.HEADER.size:])
        req, flags, size = m.HEADER.unpack_from(raw)
        if req != request or not flags & m.VHOST_USER_REPLY_MASK or size != m.U64.size:
            raise OSError(errno.EPROTO, f"unexpected reply: request {req}, flags {flags:#x}, size {size}")
        return m.U64.unpack_from(raw, m.HEADER.size)[0]

    def _receive(self, size: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise TimeoutError(errno.ETIMEDOUT, "no reply from the front end")
            chunk = self._sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionError(errno.ECONNRESET, "the front end closed the channel")
            buf += chunk
        return buf
