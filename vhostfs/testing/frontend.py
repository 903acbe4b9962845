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

import errno
import fcntl
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
#: mmap(2) values (linux/mman.h) Python's mmap module lacks: no access, and no swap reserved for the
#: window, as a VMM reserves it.
PROT_NONE = 0x0
MAP_FIXED = 0x10
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


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


@dataclass(frozen=True)
class WindowMap:
    """One mapping the back end asked for: `length` bytes of file (st_dev, st_ino) from `fd_offset`."""

    fd_offset: int
    length: int
    writable: bool
    st_dev: int
    st_ino: int


class Frontend:
    """Drives a vhost-user back end. Guest memory is one memfd of `mem_size` bytes at guest address 0."""

    def __init__(self, sock: socket.socket, mem_size: int = 64 << 20) -> None:
        self.sock = sock
        self.mem_size = mem_size
        self.mem_fd = os.memfd_create("vhostfs-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, mem_size)
        self.mem = mmap.mmap(self.mem_fd, mem_size)
        self.view = memoryview(self.mem)
        # The rings' 16-bit fields, each read and written with one 2-byte access while the back end
        # runs (struct.pack_into clears the bytes first: the back end could read 0).
        self.view16 = self.view.cast("H")
        self._brk = PAGE  # bump allocator for rings and buffers (guest address 0 left unused)
        self._alloc_lock = threading.Lock()
        self.rings: dict[int, Ring] = {}
        self.features = 0
        self.protocol_features = 0
        #: The DAX window (reserve_window) and the back-end channel that maps into it.
        self.window_addr = 0
        self.window_size = 0
        self.window_maps: dict[int, WindowMap] = {}
        self.window_lock = threading.Lock()
        #: When set, SHMEM_MAP requests are answered with a failure status (a VMM out of resources).
        self.refuse_maps = False
        #: When set, back-end requests are received but never answered (a VMM that hangs).
        self.silent_backend = False
        #: (request, shm_offset, len, status) of every back-end request served, in order.
        self.backend_log: list[tuple[int, int, int, int]] = []
        self._backend_sock: socket.socket | None = None
        self._backend_thread: threading.Thread | None = None

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
        self._close_window()
        for ring in self.rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.rings.clear()
        self.view16.release()
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

    def setup(self, queues: int = 2, num: int = 256, dax_window: int = 0) -> None:
        """Full set-up: negotiation, memory table, and `queues` rings, enabled.

        With `dax_window` (bytes), a DAX window is reserved first and the back-end channel served.
        """
        if dax_window:
            self.reserve_window(dax_window)
        self.negotiate()
        assert self.set_mem_table() == 0
        if dax_window:
            assert self.start_backend_channel() == 0
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
            self.view16[(ring.avail >> 1) + 2 + ring.num] = ring.last_used
        self.view16[(ring.avail >> 1) + 2 + ring.next_avail % ring.num] = head
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
        self.view16[(ring.avail >> 1) + 1] = ring.next_avail
        if kick:
            os.eventfd_write(ring.kick, 1)

    def used_idx(self, ring: Ring) -> int:
        return self.view16[(ring.used >> 1) + 1]

    def wait_used(self, ring: Ring, timeout: float = 10.0) -> tuple[int, int]:
        """Waits for the call eventfd and the next used element; returns (head, len).

        With EVENT_IDX, used_event is moved to the awaited element first, and the used index read
        again after a full fence, as a driver must before it sleeps (virtio 1.2, 2.7.10). Raises
        TimeoutError when no interrupt came, saying so if the element did arrive (a lost notification
        is a device bug).
        """
        if self.features & 1 << m.VIRTIO_RING_F_EVENT_IDX:
            self.view16[(ring.avail >> 1) + 2 + ring.num] = ring.last_used
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

    # -- the VMM side of the DAX window ---------------------------------------------------------
    def reserve_window(self, size: int) -> None:
        """Reserves a `size`-byte window as a VMM does for a shared memory region: inaccessible
        (PROT_NONE) until the back end maps files into it."""
        self.window_addr = native.mmap(0, size, PROT_NONE,
                                       mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self.window_size = size

    def start_backend_channel(self) -> int:
        """Hands the back end its request channel (SET_BACKEND_REQ_FD) and serves it on a thread:
        SHMEM_MAP maps the fd it carries into the window, SHMEM_UNMAP makes the range PROT_NONE
        again. Returns the SET_BACKEND_REQ_FD status."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._backend_sock = ours
        self._backend_thread = threading.Thread(target=self._serve_backend, name="frontend-backend-channel",
                                                daemon=True)
        self._backend_thread.start()
        try:
            return self.ack(R.VHOST_USER_SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()

    def get_shmem_config(self) -> list[int]:
        """GET_SHMEM_CONFIG: the size of each shared memory region the back end wants, by shmid."""
        nregions, _, *sizes = m.SHMEM_CONFIG.unpack(self.call(R.VHOST_USER_GET_SHMEM_CONFIG))
        assert nregions == sum(1 for size in sizes if size), (nregions, sizes)
        while sizes and not sizes[-1]:
            sizes.pop()
        return sizes

    def window_view(self, offset: int, length: int) -> memoryview:
        """The window's bytes at `offset` (touching an unmapped part faults: check window_readable)."""
        assert 0 <= offset and offset + length <= self.window_size
        return native.buffer(self.window_addr + offset, length)

    def window_readable(self, offset: int) -> bool:
        """Whether the window byte at `offset` can be read, asked of the kernel (write(2) from it
        into a pipe fails with EFAULT where nothing is mapped) rather than by faulting."""
        r, w = os.pipe()
        try:
            os.write(w, self.window_view(offset, 1))
            return True
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            return False
        finally:
            os.close(r)
            os.close(w)

    def _close_window(self) -> None:
        if self._backend_sock is not None:
            self._backend_sock.shutdown(socket.SHUT_RDWR)
            if self._backend_thread is not None:
                self._backend_thread.join()
            self._backend_sock.close()
            self._backend_sock = None
        if self.window_addr:
            native.munmap(self.window_addr, self.window_size)
            self.window_addr = 0

    def _serve_backend(self) -> None:
        sock = self._backend_sock
        assert sock is not None
        while True:
            fds: list[int] = []
            try:
                request, flags, size = m.HEADER.unpack(self._recv_backend(sock, m.HEADER.size, fds))
                payload = self._recv_backend(sock, size, fds) if size else b""
            except (ConnectionError, OSError):
                for fd in fds:
                    os.close(fd)
                return
            try:
                status = self._backend_request(request, payload, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if flags & m.VHOST_USER_NEED_REPLY_MASK and not self.silent_backend:
                sock.sendall(m.HEADER.pack(request, m.VHOST_USER_VERSION | m.VHOST_USER_REPLY_MASK, 8)
                             + m.U64.pack(status))

    @staticmethod
    def _recv_backend(sock: socket.socket, size: int, fds: list[int]) -> bytes:
        buf = b""
        while len(buf) < size:
            data, more, _, _ = socket.recv_fds(sock, size - len(buf), m.MAX_FDS)
            fds.extend(more)
            if not data:
                raise ConnectionError("back end closed its channel")
            buf += data
        return buf

    def _backend_request(self, request: int, payload: bytes, fds: list[int]) -> int:
        """Serves one back-end request as a VMM would; returns the status to acknowledge with."""
        shmid, fd_offset, shm_offset, length, flags = m.MMAP_REQUEST.unpack_from(payload)
        with self.window_lock:
            if request == m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP:
                status = self._shmem_map(shmid, fds, fd_offset, shm_offset, length, flags)
            elif request == m.BackendRequest.VHOST_USER_BACKEND_SHMEM_UNMAP:
                status = self._shmem_unmap(shmid, shm_offset, length)
            else:
                status = 1
            self.backend_log.append((request, shm_offset, length, status))
        return status

    def _window_range_ok(self, shmid: int, shm_offset: int, length: int) -> bool:
        return (shmid == 0 and self.window_addr != 0 and length > 0 and shm_offset % PAGE == 0
                and length % PAGE == 0 and shm_offset + length <= self.window_size)

    def _shmem_map(self, shmid: int, fds: list[int], fd_offset: int, shm_offset: int, length: int,
                   flags: int) -> int:
        if self.refuse_maps or len(fds) != 1 or not self._window_range_ok(shmid, shm_offset, length):
            return 1
        # QEMU 11.1 maps the fd as guest RAM (memory_region_init_ram_from_fd), which refuses a
        # range past the end of the file ("backing store size ... is too small"), and maps it shared
        # and writable even for a read-only mapping, so a read-only fd fails ("unable to map backing
        # store for guest RAM: Permission denied").
        if fd_offset + length > os.lseek(fds[0], 0, os.SEEK_END):
            return 1
        if fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return 1
        # vhost-user.rst, SHMEM_MAP: mapping over an existing mapping is not allowed.
        end = shm_offset + length
        if any(off < end and shm_offset < off + mp.length for off, mp in self.window_maps.items()):
            return 1
        writable = bool(flags & m.VHOST_USER_FLAG_MAP_RW)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            native.mmap(self.window_addr + shm_offset, length, prot, mmap.MAP_SHARED | MAP_FIXED,
                        fds[0], fd_offset)
        except OSError:
            return 1
        st = os.fstat(fds[0])
        self.window_maps[shm_offset] = WindowMap(fd_offset, length, writable, st.st_dev, st.st_ino)
        return 0

    def _shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        # The range must be one whole earlier mapping (vhost-user.rst, SHMEM_UNMAP).
        found = self.window_maps.get(shm_offset)
        if shmid != 0 or found is None or found.length != length:
            return 1
        native.mmap(self.window_addr + shm_offset, length, PROT_NONE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE)
        del self.window_maps[shm_offset]
        return 0

