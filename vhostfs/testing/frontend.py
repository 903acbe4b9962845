"""A vhost-user front end in Python: the VMM and the guest's virtio driver, for tests and benchmarks.

It creates guest memory in a memfd, lays out split virtqueues in it, negotiates with a back end over
its Unix socket exactly as a VMM does, and posts requests on the rings as a guest driver does:

    with Frontend.connect("/tmp/vfs.sock") as fe:
        fe.setup()
        reply = fe.request(1, b"...fuse request...", reply_size=4096)

Everything is built from the protocol, not from the back end's code, so it checks the daemon from the
outside. Raw access (`send`, `raw_header`, ring fields) lets tests send malformed input on purpose.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
from dataclasses import dataclass

from vhostfs import native
from vhostfs.vhost_user import messages as m
from vhostfs.virtqueue.split import (
    DESC,
    U16,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

R = m.Request
PAGE = 4096
#: Where the front end pretends its guest memory is mapped in its own address space.
UVA_BASE = 0x7F00_0000_0000


def _align(n: int, a: int = PAGE) -> int:
    return (n + a - 1) & ~(a - 1)


@dataclass
class Ring:
    """Driver side of one split virtqueue laid out in guest memory."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int
    next_avail: int = 0
    last_used: int = 0
    free_head: int = 0


class Frontend:
    """Drives a vhost-user back end. Guest memory is one memfd of `mem_size` bytes at guest address 0."""

    def __init__(self, sock: socket.socket, mem_size: int = 64 << 20) -> None:
        self.sock = sock
        self.mem_size = mem_size
        self.mem_fd = os.memfd_create("vhostfs-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, mem_size)
        self.mem = mmap.mmap(self.mem_fd, mem_size)
        self.view = memoryview(self.mem)
        self._brk = PAGE  # bump allocator for rings and buffers (guest address 0 left unused)
        self._alloc_lock = threading.Lock()
        self.rings: dict[int, Ring] = {}
        self.features = 0
        self.protocol_features = 0

    @classmethod
    def connect(cls, path: str, **kw) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.settimeout(30)
        return cls(sock, **kw)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        for ring in self.rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.rings.clear()
        self.view.release()
        self.mem.close()
        os.close(self.mem_fd)

    # -- guest memory ---------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        with self._alloc_lock:
            addr = _align(self._brk, align)
            if addr + size > self.mem_size:
                raise MemoryError("test guest memory exhausted")
            self._brk = addr + size
            return addr

    def uva(self, gpa: int) -> int:
        return UVA_BASE + gpa

    # -- messages -------------------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0,
             need_reply: bool = False) -> None:
        flags |= m.VHOST_USER_VERSION | (m.VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        data = m.HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def raw(self, data: bytes, fds: list[int] | None = None) -> None:
        """Sends arbitrary bytes (for malformed-message tests)."""
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("back end closed the connection")
            buf += chunk
        return buf

    def recv_reply(self, request: int) -> bytes:
        req, flags, size = m.HEADER.unpack(self._recv_exact(m.HEADER.size))
        if req != request or not flags & m.VHOST_USER_REPLY_MASK:
            raise AssertionError(f"expected reply to {request}, got request {req} flags {flags:#x}")
        return self._recv_exact(size)

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Sends a request that has a reply and returns the reply payload."""
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        return m.U64.unpack(self.call(request, payload))[0]

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Sends a request with NEED_REPLY (REPLY_ACK) and returns the status (0: success)."""
        self.send(request, payload, fds, need_reply=True)
        return m.U64.unpack(self.recv_reply(request))[0]

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the back end closes the connection within `timeout` seconds."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r) and self.sock.recv(1) == b""

    # -- set-up as a VMM does it ----------------------------------------------------------------
    def negotiate(self, features: int | None = None, protocol_features: int | None = None) -> None:
        offered = self.call_u64(R.VHOST_USER_GET_FEATURES)
        self.features = offered if features is None else features
        offered_proto = self.call_u64(R.VHOST_USER_GET_PROTOCOL_FEATURES)
        self.protocol_features = offered_proto if protocol_features is None else protocol_features
        self.send(R.VHOST_USER_SET_PROTOCOL_FEATURES, m.U64.pack(self.protocol_features))
        self.send(R.VHOST_USER_SET_OWNER)
        self.send(R.VHOST_USER_SET_FEATURES, m.U64.pack(self.features))

    def region_payload(self, gpa: int, size: int, offset: int) -> bytes:
        return m.MEMORY_REGION.pack(gpa, size, self.uva(gpa), offset)

    def set_mem_table(self) -> int:
        payload = m.MEMORY_HEADER.pack(1, 0) + self.region_payload(0, self.mem_size, 0)
        return self.ack(R.VHOST_USER_SET_MEM_TABLE, payload, [self.mem_fd])

    def add_ring(self, index: int, num: int = 256, *, enable: bool = True) -> Ring:
        desc = self.alloc(desc_table_size(num), PAGE)
        avail = self.alloc(avail_ring_size(num), 2)
        used = self.alloc(used_ring_size(num), PAGE)
        ring = Ring(index, num, desc, avail, used, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                    os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.rings[index] = ring
        self.send(R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(index, num))
        self.send(R.VHOST_USER_SET_VRING_BASE, m.VRING_STATE.pack(index, 0))
        self.send(R.VHOST_USER_SET_VRING_ADDR, m.VRING_ADDR.pack(
            index, 0, self.uva(desc), self.uva(used), self.uva(avail), 0))
        self.send(R.VHOST_USER_SET_VRING_CALL, m.U64.pack(index), [ring.call])
        self.send(R.VHOST_USER_SET_VRING_KICK, m.U64.pack(index), [ring.kick])
        if enable:
            self.send(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(index, 1))
        return ring

    def setup(self, queues: int = 2, num: int = 256) -> None:
        """Full set-up: negotiation, memory table, and `queues` rings, enabled."""
        self.negotiate()
        assert self.set_mem_table() == 0
        for i in range(queues):
            self.add_ring(i, num)
        self.sync()

    def sync(self) -> None:
        """Round trip: returns once the back end has handled everything sent before."""
        self.call_u64(R.VHOST_USER_GET_FEATURES)

    # -- the driver side ------------------------------------------------------------------------
    def write_desc(self, ring: Ring, idx: int, addr: int, length: int, flags: int, nxt: int) -> None:
        DESC.pack_into(self.view, ring.desc + 16 * idx, addr, length, flags, nxt)

    def make_chain(self, ring: Ring, out_bufs: list[tuple[int, int]], in_bufs: list[tuple[int, int]]) -> int:
        """Writes a chain of (addr, len) buffers, readable then writable; returns its head index."""
        bufs = [(a, n, 0) for a, n in out_bufs] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_bufs]
        head = ring.free_head
        for i, (addr, length, flags) in enumerate(bufs):
            idx = (head + i) % ring.num
            last = i == len(bufs) - 1
            self.write_desc(ring, idx, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                            (idx + 1) % ring.num)
        ring.free_head = (head + len(bufs)) % ring.num
        return head

    def make_indirect(self, ring: Ring, out_bufs: list[tuple[int, int]],
                      in_bufs: list[tuple[int, int]]) -> int:
        bufs = [(a, n, 0) for a, n in out_bufs] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_bufs]
        table = self.alloc(16 * len(bufs))
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            DESC.pack_into(self.view, table + 16 * i, addr, length,
                           flags | (0 if last else VIRTQ_DESC_F_NEXT), i + 1)
        head = ring.free_head
        self.write_desc(ring, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        ring.free_head = (head + 1) % ring.num
        return head

    def publish(self, ring: Ring, head: int, kick: bool = True) -> None:
        """Makes chain `head` available and kicks.

        With EVENT_IDX, used_event asks for an interrupt as soon as the device uses the oldest
        element not yet seen (virtio 1.2, 2.7.10); it is stored before the avail index, and the kick
        (a system call) orders both before whatever the device does next.
        """
        if self.features & 1 << m.VIRTIO_RING_F_EVENT_IDX:
            U16.pack_into(self.view, ring.avail + 4 + 2 * ring.num, ring.last_used)
        U16.pack_into(self.view, ring.avail + 4 + 2 * (ring.next_avail % ring.num), head)
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
        U16.pack_into(self.view, ring.avail + 2, ring.next_avail)
        if kick:
            os.eventfd_write(ring.kick, 1)

    def used_idx(self, ring: Ring) -> int:
        return U16.unpack_from(self.view, ring.used + 2)[0]

    def wait_used(self, ring: Ring, timeout: float = 10.0) -> tuple[int, int]:
        """Waits for the call eventfd and the next used element; returns (head, len).

        With EVENT_IDX, used_event is moved to the awaited element first, and the used index read
        again after a full fence, as a driver must before it sleeps (virtio 1.2, 2.7.10). Raises
        TimeoutError when no interrupt came, saying so if the element did arrive (a lost notification
        is a device bug).
        """
        if self.features & 1 << m.VIRTIO_RING_F_EVENT_IDX:
            U16.pack_into(self.view, ring.avail + 4 + 2 * ring.num, ring.last_used)
            native.mb()
        while self.used_idx(ring) == ring.last_used:
            r, _, _ = select.select([ring.call], [], [], timeout)
            if not r:
                late = self.used_idx(ring) != ring.last_used
                raise TimeoutError(f"no interrupt on queue {ring.index}"
                                   + (" although the used ring advanced" if late else ""))
            try:
                os.eventfd_read(ring.call)
            except BlockingIOError:
                pass
        slot = ring.last_used % ring.num
        head, length = USED_ELEM.unpack_from(self.view, ring.used + 4 + 8 * slot)
        ring.last_used = (ring.last_used + 1) & 0xFFFF
        return head, length

    def request(self, index: int, data: bytes, reply_size: int = 4096, *, indirect: bool = False,
                timeout: float = 10.0, arena: int | None = None) -> bytes:
        """Posts `data` (device-readable) and `reply_size` writable bytes; returns the bytes written.

        The buffers are allocated, or placed at guest address `arena` (a caller's own area, so that
        threads driving different queues do not share buffers).
        """
        ring = self.rings[index]
        if arena is None:
            src = self.alloc(max(len(data), 1))
            dst = self.alloc(reply_size) if reply_size else 0
        else:
            src, dst = arena, _align(arena + len(data), 16)
        self.view[src:src + len(data)] = data
        in_bufs = [(dst, reply_size)] if reply_size else []
        maker = self.make_indirect if indirect else self.make_chain
        head = maker(ring, [(src, len(data))], in_bufs)
        self.publish(ring, head)
        got_head, length = self.wait_used(ring, timeout)
        assert got_head == head, f"used head {got_head}, expected {head}"
        return bytes(self.view[dst:dst + length])

