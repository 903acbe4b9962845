"""The seed corpus of the vhost-user fuzzer: the session a VMM opens (in QEMU's order: features,
protocol features, owner, memory, rings, dirty log, stop, reset), every request the session serves,
built from the message structs, and the code that plays (possibly mutated) messages over a socket.

Unmutated, every request is answered with success, except SET_CONFIG, which the virtio-fs device
refuses by design (its configuration space is read-only).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.connection import Connection
from vhostfs.vhost_user.handler import SESSION_PROTOCOL_FEATURES, Session
from vhostfs.virtqueue import split

R = m.Request
MEM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000
UVA2 = 0x7F10_0000_0000
GPA2 = 1 << 32
LOG_SIZE = 4096
VALID_FLAGS = m.VHOST_USER_VERSION
NEED_REPLY = m.VHOST_USER_NEED_REPLY_MASK
SHMEM_SIZE = 1 << 20


class RecordingBackend:
    """A back end that accepts every ring and remembers the calls (and one DAX-sized shared memory
    region, so that GET_SHMEM_CONFIG has something to describe)."""

    max_queues = 2
    features = 1 << m.VIRTIO_F_VERSION_1 | 1 << m.VIRTIO_RING_F_EVENT_IDX | 1 << m.VHOST_F_LOG_ALL
    protocol_features = (1 << m.VHOST_USER_PROTOCOL_F_CONFIG | 1 << m.VHOST_USER_PROTOCOL_F_SHMEM
                         | 1 << m.VHOST_USER_PROTOCOL_F_DEVICE_STATE)
    shmem_regions = [SHMEM_SIZE]
    check_ring_size = staticmethod(split.check_queue_size)
    check_ring_addresses = staticmethod(split.check_ring_addresses)

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start_queue(self, index, vring, memory, features, log=None):
        self.events.append(("start", index, log is not None))

    def stop_queue(self, index):
        self.events.append(("stop", index))
        return 7

    def set_call_fd(self, index, fd):
        self.events.append(("call", index))

    def set_memory(self, memory):
        self.events.append(("memory", len(memory.regions)))

    def config(self):
        return b"tag".ljust(36, b"\0") + (1).to_bytes(4, "little")

    def reset(self):
        self.events.append(("reset",))

    def save_state(self) -> bytes:
        self.events.append(("save",))
        return b"device state"

    def load_state(self, data: bytes) -> None:
        self.events.append(("load", data))

    def set_backend_channel(self, channel):
        self.events.append(("channel", channel is not None))
        if channel is not None:
            channel.close()


#: fd kinds a message may carry.
FD_KINDS = ("memfd", "eventfd", "socket", "log", "pipe")
#: Requests answered with a payload of their own (vhost-user.rst, "Communication").
WITH_REPLY = {R.VHOST_USER_GET_FEATURES, R.VHOST_USER_GET_PROTOCOL_FEATURES, R.VHOST_USER_GET_VRING_BASE,
              R.VHOST_USER_GET_QUEUE_NUM, R.VHOST_USER_GET_CONFIG, R.VHOST_USER_GET_MAX_MEM_SLOTS,
              R.VHOST_USER_GET_SHMEM_CONFIG}


@dataclass(frozen=True)
class Msg:
    """One message: payload parts are (Struct, values) pairs or raw bytes."""

    request: int
    parts: tuple = ()
    fds: tuple[str, ...] = ()
    flags: int = VALID_FLAGS | NEED_REPLY
    #: None: the payload's own length.
    size: int | None = None

    def payload(self) -> bytes:
        out = b""
        for part in self.parts:
            if isinstance(part, tuple):
                st, values = part
                out += pack_lenient(st, values)
            else:
                out += part
        return out

    def wire(self) -> bytes:
        payload = self.payload()
        size = len(payload) if self.size is None else self.size
        return m.HEADER.pack(self.request & 0xFFFFFFFF, self.flags & 0xFFFFFFFF, size & 0xFFFFFFFF) + payload

    def framing_valid(self) -> bool:
        """Whether the session can read the next message after this one (header flags and size)."""
        flags = self.flags & 0xFFFFFFFF
        return (flags & m.VHOST_USER_VERSION_MASK == m.VHOST_USER_VERSION
                and not flags & ~m.VHOST_USER_FLAGS_KNOWN and not flags & m.VHOST_USER_REPLY_MASK
                and (self.size is None or self.size == len(self.payload()))
                and len(self.payload()) <= m.MAX_PAYLOAD)


def pack_lenient(st: struct.Struct, values) -> bytes:
    """`st.pack(*values)` with each value wrapped into its field's range."""
    codes = [c for c in st.format[1:] if c.isalpha() and c != "x"]
    out = []
    for code, v in zip(codes, values, strict=True):
        bits = struct.calcsize(code) * 8
        out.append(v & (1 << bits) - 1)
    return st.pack(*out)


def _u64(v: int) -> tuple:
    return (m.U64, (v,))


def _state(index: int, num: int) -> tuple:
    return (m.VRING_STATE, (index, num))


def _addr(index: int, flags: int) -> tuple:
    return (m.VRING_ADDR, (index, flags, UVA, UVA + 0x2000, UVA + 0x1000, 0x3000))


PROTOCOL = SESSION_PROTOCOL_FEATURES | RecordingBackend.protocol_features
FEATURES = 1 << m.VIRTIO_F_VERSION_1 | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES | 1 << m.VIRTIO_RING_F_EVENT_IDX
REGION = (m.MEMORY_REGION, (0, MEM_SIZE, UVA, 0))
REGION2 = (m.MEMORY_REGION, (GPA2, MEM_SIZE, UVA2, 0))

#: The seed session, in order.
SEED: tuple[Msg, ...] = (
    Msg(R.VHOST_USER_GET_FEATURES),
    Msg(R.VHOST_USER_GET_PROTOCOL_FEATURES),
    Msg(R.VHOST_USER_SET_PROTOCOL_FEATURES, (_u64(PROTOCOL),)),
    Msg(R.VHOST_USER_SET_OWNER),
    Msg(R.VHOST_USER_GET_QUEUE_NUM),
    Msg(R.VHOST_USER_GET_MAX_MEM_SLOTS),
    Msg(R.VHOST_USER_SET_BACKEND_REQ_FD, fds=("socket",)),
    Msg(R.VHOST_USER_GET_CONFIG, ((m.CONFIG_HEADER, (0, 40, 0)), bytes(40))),
    Msg(R.VHOST_USER_SET_CONFIG, ((m.CONFIG_HEADER, (0, 4, 0)), b"tag2")),
    Msg(R.VHOST_USER_GET_SHMEM_CONFIG),
    Msg(R.VHOST_USER_SET_FEATURES, (_u64(FEATURES),)),
    Msg(R.VHOST_USER_SET_MEM_TABLE, ((m.MEMORY_HEADER, (1, 0)), REGION), ("memfd",)),
    Msg(R.VHOST_USER_ADD_MEM_REG, (bytes(8), REGION2), ("memfd",)),
    Msg(R.VHOST_USER_SET_VRING_NUM, (_state(1, 256),)),
    Msg(R.VHOST_USER_SET_VRING_BASE, (_state(1, 0),)),
    Msg(R.VHOST_USER_SET_VRING_ADDR, (_addr(1, 1 << m.VHOST_VRING_F_LOG),)),
    Msg(R.VHOST_USER_SET_VRING_CALL, (_u64(1),), ("eventfd",)),
    Msg(R.VHOST_USER_SET_VRING_ERR, (_u64(1),), ("eventfd",)),
    Msg(R.VHOST_USER_SET_VRING_KICK, (_u64(1),), ("eventfd",)),
    Msg(R.VHOST_USER_SET_VRING_ENABLE, (_state(1, 1),)),
    Msg(R.VHOST_USER_SET_LOG_BASE, ((m.LOG, (LOG_SIZE, 0)),), ("log",)),
    Msg(R.VHOST_USER_SET_LOG_FD, fds=("eventfd",)),
    Msg(R.VHOST_USER_SET_FEATURES, (_u64(FEATURES | 1 << m.VHOST_F_LOG_ALL),)),
    Msg(R.VHOST_USER_SET_VRING_ADDR, (_addr(1, 0),)),
    Msg(R.VHOST_USER_SET_VRING_CALL, (_u64(1 | m.VHOST_USER_VRING_NOFD_MASK),)),
    Msg(R.VHOST_USER_REM_MEM_REG, (bytes(8), REGION2), ("memfd",)),
    Msg(R.VHOST_USER_GET_VRING_BASE, (_state(1, 0),)),
    # The rings stopped, the state can be saved (direction SAVE, phase STOPPED) into a pipe.
    Msg(R.VHOST_USER_SET_DEVICE_STATE_FD, ((m.DEVICE_STATE_PARAMS, (0, 0)),), ("pipe",)),
    Msg(R.VHOST_USER_CHECK_DEVICE_STATE),
    Msg(R.VHOST_USER_SET_VRING_ENABLE, (_state(1, 0),)),
    Msg(R.VHOST_USER_RESET_DEVICE),
    Msg(R.VHOST_USER_RESET_OWNER),
)
#: Seed requests refused on purpose, and why.
REFUSED = {R.VHOST_USER_SET_CONFIG: "the virtio-fs configuration space is read-only"}


def make_fd(kind: str, keep: list) -> int:
    """A new fd of `kind` for a message (the sender closes its copy after sending)."""
    if kind == "memfd":
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM_SIZE)
        return fd
    if kind == "log":
        fd = os.memfd_create("fuzz-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, LOG_SIZE)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == "pipe":
        r, w = os.pipe()
        keep.append(os.fdopen(r, "rb"))  # the state written stays in the pipe's buffer
        return w
    ours, theirs = socket.socketpair()
    keep.append(ours)
    fd = os.dup(theirs.fileno())
    theirs.close()
    return fd


@dataclass
class Peer:
    """The front end's side of a session served on a thread over a socket pair."""

    backend: RecordingBackend = field(default_factory=RecordingBackend)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(30)
        self.keep: list = []
        self.session = Session(self.backend)

        def serve() -> None:
            try:
                self.session.serve(Connection(theirs))
            except BaseException as e:  # the property under test: nothing escapes serve()
                self.errors.append(e)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def send(self, msg: Msg) -> bool:
        """Sends `msg`; False if the session has already closed the connection."""
        fds = [make_fd(kind, self.keep) for kind in msg.fds]
        try:
            if fds:
                socket.send_fds(self.sock, [msg.wire()], fds)
            else:
                self.sock.sendall(msg.wire())
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False
        finally:
            for fd in fds:
                os.close(fd)

    def reply(self, request: int) -> bytes:
        """The payload of the reply to `request` (the header is checked)."""
        header = self._recv(m.HEADER.size)
        got, flags, size = m.HEADER.unpack(header)
        assert (got, flags) == (request, m.VHOST_USER_VERSION | m.VHOST_USER_REPLY_MASK), (got, hex(flags))
        return self._recv(size)

    def _recv(self, size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            assert chunk, "the session closed the connection"
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()
        self.thread.join(30)
        for s in self.keep:
            s.close()
        assert not self.thread.is_alive(), "the session did not end after the front end closed"
